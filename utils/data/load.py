"""One entry point for every data format: :func:`load_data`."""

from __future__ import annotations

from typing import Sequence

from ..config import Settings
from ..errors import DataError
from .demo import ensure_demo
from .mvtec import MvtecLoader
from .sets import SPLITS, DataBundle
from .study import StudyLoader
from .volumes import load_volume_data


def load_data(settings: Settings, splits: Sequence[str] = SPLITS) -> DataBundle:
    """Build the requested ``splits`` (any of "train", "val", "test") for ``settings.data.format``:
    ``demo`` (study layout at ``data.root``, generated there if absent, :func:`utils.data.demo.ensure_demo`),
    ``study``, ``mvtec`` or ``nifti`` (:mod:`utils.data.volumes`). Splits not requested are ``None``
    (``test``: empty dict). Without a validation split, ``val`` is held out of the training
    images (``data.val_fraction``, :func:`utils.data.sets.hold_out`)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r}; allowed: {', '.join(SPLITS)}")
    ensure_demo(settings)
    fmt = settings.data.format
    if fmt == "nifti":
        return load_volume_data(settings, splits)
    if fmt in ("demo", "study"):
        return StudyLoader(settings).load(splits)
    return MvtecLoader(settings).load(splits)
