"""PaDiM for anomaly detection: config, data, backbone features, Gaussian fitting, scoring, metrics, plots.

One module, one job:

- :mod:`utils.config`      typed, validated settings from ``config.yaml``
- :mod:`utils.preprocess`  the single image/mask preprocessing path
- :mod:`utils.data`        study layout, MVTec AD layout, demo set -> datasets
- :mod:`utils.backbones`   stride-4/8/16 feature extractors (ResNet, EfficientNet-Lite)
- :mod:`utils.features`    patch embeddings with seeded random channel selection
- :mod:`utils.gaussian`    streaming mean/covariance, Cholesky whitening
- :mod:`utils.scoring`     Mahalanobis maps, upsampling, blur, image scores
- :mod:`utils.model`       the fitted estimator: fit / score / save / load
- :mod:`utils.model_file`  the model file: save, load, validation, compatibility check
- :mod:`utils.metrics`     pixel/image AUROC, AP, Dice
- :mod:`utils.evaluation`  per-group evaluation and results files
- :mod:`utils.report`      metrics.md and the command line's summary
- :mod:`utils.plotting`    heat-maps and figures
- :mod:`utils.distributed` torch.distributed fitting and scoring

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
