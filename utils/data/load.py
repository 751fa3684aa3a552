"""One entry point for every data format: :func:`load_data`."""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Sequence

from ..config import Settings
from ..errors import DataError
from .demo import ensure_demo
from .mvtec import MvtecLoader
from .sets import SPLITS, DataBundle, counted
from .study import StudyLoader
from .volumes import load_volume_data


class TrainTestOverlapWarning(UserWarning):
    """A test image or volume is also a training file (the same file, or one with the same content)."""


def load_data(settings: Settings, splits: Sequence[str] = SPLITS) -> DataBundle:
    """Build the requested ``splits`` (any of "train", "val", "test") for ``settings.data.format``:
    ``demo`` (study layout at ``data.root``, generated there if absent, :func:`utils.data.demo.ensure_demo`),
    ``study``, ``mvtec`` or ``nifti`` (:mod:`utils.data.volumes`). Splits not requested are ``None``
    (``test``: empty dict). Without a validation split, ``val`` is held out of the training
    images (``data.val_fraction``, :func:`utils.data.sets.hold_out`). Test files that are also
    training files are named in a :class:`TrainTestOverlapWarning`."""
    if unknown := [s for s in splits if s not in SPLITS]:
        raise DataError(f"unknown split {unknown[0]!r}; allowed: {', '.join(SPLITS)}")
    ensure_demo(settings)
    if settings.data.format == "nifti":
        bundle = load_volume_data(settings, splits)
    else:
        bundle = (MvtecLoader if settings.data.format == "mvtec" else StudyLoader)(settings).load(splits)
    warn_overlap(bundle)
    return bundle


def warn_overlap(bundle: DataBundle) -> None:
    """Warn when a test file is also a training file: the same file (links resolved), or the same
    bytes (hashed only where a test and a training file have the same size)."""
    if bundle.train is None:
        return
    train = {os.path.realpath(path) for path in bundle.train.paths}
    test = dict.fromkeys(os.path.realpath(path) for group in bundle.test.values() for path in group.paths)
    size = {path: os.path.getsize(path) for path in (*train, *test)}
    shared = {size[path] for path in train} & {size[path] for path in test}
    hashed = {_digest(path) for path in train if size[path] in shared}
    same = [path for path in test if path in train or size[path] in shared and _digest(path) in hashed]
    if same:
        warnings.warn(f"{counted(len(same), 'test file')} also in the training data (the same file or the same "
                      f"content), e.g. {same[0]}: their scores measure memory, not detection",
                      TrainTestOverlapWarning, stacklevel=3)


def _digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
