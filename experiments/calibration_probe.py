"""Probe for docs/quality.md (not a feature): calibrate every pixel of the anomaly map by the
held-out maps of the training normals, and report validation (synthetic lesions) and test numbers.

Five-fold: PaDiM is fitted on 4/5 of the training images and scores the other 1/5, so each of the
130 fastMRI normals gets an out-of-sample map; their per-pixel mean (and standard deviation) is
the normal level of that pixel. Variants: ``sub`` (map - mean) and ``z`` ((map - mean) / std, the
std floored at a fraction of its median). The final model is fitted on all training images.
Writes nothing.

    python experiments/calibration_probe.py [configs/fast_ixi.yaml]      # ~2 min on 2 cores
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import (  # noqa: E402
    FAST_IXI, as_batches, command_line, fitted_run, group_mean, group_text, validation_text)
from experiments.synthetic_val import synthetic_set, validation_metrics  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.data import Loader, load_data  # noqa: E402
from utils.padim import Padim, ScoreResult  # noqa: E402
from utils.padim.scoring import image_scores  # noqa: E402

FOLDS = 5
DRAWS = 10
#: (variant, floor of the std as a fraction of its median; None: no division).
VARIANTS = (("sub", None), ("z", 0.5), ("z", 1.0))


class CalibratedPadim(Padim):
    """PaDiM whose maps are calibrated per pixel by ``level`` (and divided by ``spread``)."""

    level: np.ndarray
    spread: np.ndarray | None = None

    def score(self, images, progress=True, region=None):
        maps = super().score(images, progress, region).maps - self.level
        if self.spread is not None:
            maps = maps / self.spread
        maps = maps.astype(np.float32)
        return ScoreResult(maps, image_scores(torch.from_numpy(maps), self.settings.image_score, region).numpy())


def held_out_maps(settings: Settings, images: torch.Tensor, heads: Optional[torch.Tensor]) -> np.ndarray:
    """Each training image's map from the model fitted on the other folds."""
    fold = torch.arange(len(images)) % FOLDS

    def batches(rows: torch.Tensor) -> list[dict]:
        return as_batches(images[rows], None if heads is None else heads[rows], settings.batch_size)

    held_out = np.zeros((len(images), settings.input_size, settings.input_size), np.float32)
    for k in range(FOLDS):
        model = Padim(settings).fit(batches(fold != k), progress=False)
        held_out[(fold == k).numpy()] = model.score(batches(fold == k), progress=False).maps
    return held_out


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_line(__file__, __doc__)
    parser.add_argument("config", nargs="?", default=FAST_IXI, help="config file (default: configs/fast_ixi.yaml)")
    settings = load_config(parser.parse_args(argv).config)
    batches = list(Loader(load_data(settings, ("train",)).train, settings))
    images = torch.cat([batch["image"] for batch in batches])
    heads = torch.cat([batch["foreground"] for batch in batches]) if "foreground" in batches[0] else None
    started = time.perf_counter()
    held_out = held_out_maps(settings, images, heads)
    print(f"{FOLDS}-fold held-out maps of {len(images)} training images: {time.perf_counter() - started:.0f} s")
    level, spread = held_out.mean(0), held_out.std(0)
    synthetic = synthetic_set(settings, DRAWS)
    for mode, floor in VARIANTS:
        model = CalibratedPadim(settings).fit(batches, progress=False)
        model.level = level
        model.spread = None if floor is None else np.maximum(spread, np.median(spread) * floor)
        label = f"{mode} {floor or 0}"
        print(f"{label} {validation_text(validation_metrics(model, synthetic))}")
        print(f"{label} {group_text(group_mean(fitted_run(settings, model)))}", flush=True)


if __name__ == "__main__":
    main()
