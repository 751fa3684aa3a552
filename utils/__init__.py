"""PaDiM for anomaly detection: config, data, backbone features, Gaussian fitting, scoring, metrics, plots.

One module, one job:

- :mod:`utils.config`            typed, validated settings from ``config.yaml``
- :mod:`utils.preprocess`        the single image/mask preprocessing path
- :mod:`utils.data`              study layout, MVTec AD layout, demo set -> datasets
- :mod:`utils.volumes`           NIfTI volumes: manifest, slicing, maps back in scan space
- :mod:`utils.backbones`         stride-4/8/16 feature extractors (ResNet, EfficientNet-Lite)
- :mod:`utils.features`          patch embeddings with seeded random channel selection
- :mod:`utils.gaussian`          streaming mean/covariance, Cholesky whitening
- :mod:`utils.shrinkage`         optional Ledoit-Wolf covariance shrinkage
- :mod:`utils.scoring`           Mahalanobis maps, upsampling, blur, image scores
- :mod:`utils.model`             the fitted estimator: fit / score / save / load
- :mod:`utils.model_file`        the model file: save, load, validation, compatibility check
- :mod:`utils.metrics`           pixel/image AUROC, AP, Dice, AUPRO
- :mod:`utils.evaluation`        per-group evaluation and results folder
- :mod:`utils.volume_evaluation` the same steps per NIfTI volume
- :mod:`utils.report`            metrics.md and the command line's summary
- :mod:`utils.plotting`          heat-maps and figures (matplotlib, object API)
- :mod:`utils.distributed`       torch.distributed fitting and scoring
- :mod:`utils.demo_data`, :mod:`utils.demo_nifti`, :mod:`utils.demo_mvtec`  synthetic data sets
- :mod:`utils.files`, :mod:`utils.errors`, :mod:`utils.cli`   atomic writes, error types, ``python -m utils``

Importing the package changes nothing in the process (no thread, allocator or global settings).
"""

from importlib import import_module

#: Public names and their modules: imported on first use, so that ``python -m utils`` can install its
#: Ctrl-C / SIGTERM handling before torch is imported (which takes seconds).
_EXPORTS = {
    "ConfigError": "errors", "DataError": "errors", "ModelFileError": "errors", "PadimError": "errors",
    "Padim": "model", "ScoreResult": "model", "Settings": "config", "load_config": "config", "settings_from_dict": "config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'utils' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
