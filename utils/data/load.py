"""One entry point for every data format: :func:`load_data`."""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Sequence

import torch

from ..config import Settings
from ..errors import DataError
from .demo import ensure_demo
from .mvtec import MvtecLoader
from .sets import SPLITS, DataBundle, counted
from .study import StudyLoader
from .volumes import load_volume_data


class TrainTestOverlapWarning(UserWarning):
    """A test or predicted image or volume is also a training file (the same file, or one with the same content)."""


def load_data(settings: Settings, splits: Sequence[str] = SPLITS) -> DataBundle:
    """Build the requested ``splits`` (any of "train", "val", "test") for ``settings.data.format``:
    ``demo`` (study layout at ``data.root``, generated there if absent, :func:`utils.data.demo.ensure_demo`),
    ``study``, ``mvtec`` or ``nifti`` (:mod:`utils.data.volumes`). Splits not requested are ``None``
    (``test``: empty dict). Without a validation split, ``val`` is held out of the training
    images (``data.val_fraction``, :func:`utils.data.sets.hold_out`). The training files' content
    digests are the bundle's ``train_digests`` (:func:`file_digests`); validation and test files that
    are also training files are named in a :class:`TrainTestOverlapWarning`."""
    if unknown := [s for s in splits if s not in SPLITS]:
        raise DataError(f"unknown split {unknown[0]!r}; allowed: {', '.join(SPLITS)}")
    ensure_demo(settings)
    if settings.data.format == "nifti":
        bundle = load_volume_data(settings, splits)
    else:
        bundle = (MvtecLoader if settings.data.format == "mvtec" else StudyLoader)(settings).load(splits)
    if bundle.train is not None:
        bundle.train_digests = file_digests(bundle.train.paths)
        if bundle.val is not None:  # the threshold and colour scale would be partly in-sample
            warn_trained_on(bundle.val.paths, bundle.train_digests, "validation file")
        test = [path for group in bundle.test.values() for path in group.paths]
        warn_trained_on(test, bundle.train_digests, "test file")
    return bundle


def file_digests(paths: Sequence[str]) -> torch.Tensor:
    """``(F,)`` int64: the first 8 bytes of each file's SHA-256, a file's content as a number (a model
    records those of its training files)."""
    digests = []
    for path in dict.fromkeys(paths):
        with open(path, "rb") as handle:
            digests.append(int.from_bytes(hashlib.file_digest(handle, "sha256").digest()[:8], "big", signed=True))
    return torch.tensor(digests, dtype=torch.int64)


def warn_trained_on(paths: Sequence[str], train_digests: torch.Tensor, what: str) -> None:
    """Warn when any of ``paths`` is a training file: the same file, a link to it or a copy (the same bytes).
    Only regular files are read here (a pipe would never end); the readers name the others."""
    paths = [path for path in dict.fromkeys(paths) if os.path.isfile(path)]
    same = [path for path, found in zip(paths, torch.isin(file_digests(paths), train_digests)) if found]
    if same:
        warnings.warn(f"{counted(len(same), what)} also in the training data (the same file or the same "
                      f"content), e.g. {same[0]}: their scores measure memory, not detection",
                      TrainTestOverlapWarning, stacklevel=3)
