"""PaDiM for anomaly detection, in layers that import only downwards (docs/architecture.md):

- :mod:`utils.errors`, :mod:`utils.files`  error types; atomic files and folders
- :mod:`utils.config`       typed, validated settings from ``config.yaml``
- :mod:`utils.padim`        the method: backbones, features, Gaussian statistics, scoring, alignment,
                            the :class:`Padim` estimator and its file
- :mod:`utils.data`         data formats (study, demo, MVTec AD, NIfTI), one preprocessing path, demo sets
- :mod:`utils.distributed`  ``torchrun``: sharded fitting
- :mod:`utils.evaluation`   one run for images and volumes: metrics, report, figures, results folder
- :mod:`utils.predict`, :mod:`utils.cli`, :mod:`utils.demo_data`  the commands

Importing the package changes nothing in the process (no thread, allocator or global settings).
"""

from importlib import import_module

#: Public names and their modules: imported on first use, so that ``python -m utils`` can install its
#: Ctrl-C / SIGTERM handling before torch is imported (which takes seconds).
_EXPORTS = {
    "ConfigError": "errors", "DataError": "errors", "ModelFileError": "errors", "PadimError": "errors",
    "Padim": "padim", "ScoreResult": "padim", "Settings": "config", "load_config": "config", "settings_from_dict": "config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'utils' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
