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

from .config import Settings, load_config, settings_from_dict
from .errors import ConfigError, DataError, ModelFileError, PadimError
from .model import Padim, ScoreResult

__all__ = [
    "ConfigError",
    "DataError",
    "ModelFileError",
    "Padim",
    "PadimError",
    "ScoreResult",
    "Settings",
    "load_config",
    "settings_from_dict",
]
