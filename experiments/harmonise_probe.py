"""Probe for docs/quality.md (not a feature): make the 581 IXI training slices look like fastMRI and
train on all 711 images, then report validation (synthetic lesions) and test numbers.

The study's IXI slices differ from fastMRI in framing (233 x 197 px, the head filling a different
part of the frame) and intensity (exact-zero background where fastMRI has noise, a brighter brain).
Per IXI slice:

1. framing: crop/pad a square around the head (utils.padim.foreground.foreground_mask) so that the head's
   larger side takes the same fraction of the frame as the median fastMRI training slice;
2. intensity: quantile matching to the pooled intensities of the fastMRI training slices, with ties
   broken at random (seeded), so the zero background receives fastMRI's background value spread.

The model is the chosen configuration (configs/fast_ixi.yaml) fitted on the harmonised IXI slices
plus the 130 fastMRI normals; ``--fastmri-only`` fits the same code on the 130 alone (a check that the
probe reproduces the configuration's numbers). Another config may be given (its ``ixi_normal_train``
split is harmonised). Writes nothing.

    python experiments/harmonise_probe.py [--fastmri-only] [configs/fast_ixi.yaml]      # ~1.5 min on 2 cores
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import (  # noqa: E402
    FAST_IXI, as_batches, command_line, fitted_run, group_mean, group_text, stacked, validation_text)
from experiments.synthetic_val import synthetic_set, validation_metrics  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.data import load_data, prepare  # noqa: E402
from utils.data.preprocess import Prepared, read_image  # noqa: E402
from utils.padim import Padim  # noqa: E402
from utils.padim.foreground import foreground_mask  # noqa: E402

SEED = 0
DRAWS = 10


def head_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(foreground_mask(torch.from_numpy(gray)).numpy())
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def head_fraction(gray: np.ndarray) -> float:
    """Larger side of the head box over the larger side of the image (the padded square)."""
    top, bottom, left, right = head_box(gray)
    return max(bottom - top, right - left) / max(gray.shape)


def reframe(gray: np.ndarray, fraction: float) -> np.ndarray:
    """A square crop (zero-padded where needed) around the head, its larger side = ``fraction`` of the square."""
    top, bottom, left, right = head_box(gray)
    side = int(round(max(bottom - top, right - left) / fraction))
    cy, cx = (top + bottom) // 2, (left + right) // 2
    out = np.zeros((side, side), np.float32)
    y0, x0 = cy - side // 2, cx - side // 2
    sy, sx = max(0, y0), max(0, x0)
    ey, ex = min(gray.shape[0], y0 + side), min(gray.shape[1], x0 + side)
    out[sy - y0 : ey - y0, sx - x0 : ex - x0] = gray[sy:ey, sx:ex]
    return out


def match_quantiles(gray: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quantile matching to the sorted ``reference`` intensities, ties broken at random."""
    order = np.lexsort((rng.random(gray.size), gray.ravel()))
    ranks = np.empty(gray.size)
    ranks[order] = (np.arange(gray.size) + 0.5) / gray.size
    return np.interp(ranks, (np.arange(reference.size) + 0.5) / reference.size, reference).reshape(gray.shape).astype(np.float32)


def harmonised_ixi(settings: Settings, fast_gray: list[np.ndarray]) -> list[Prepared]:
    """The IXI training slices reframed and quantile-matched to the fastMRI ones ``fast_gray``."""
    ixi = load_data(settings.replace(data={"train_splits": ["ixi_normal_train"]}), ("train",)).train.paths
    fraction = float(np.median([head_fraction(g) for g in fast_gray]))
    reference = np.sort(np.concatenate([g.ravel() for g in fast_gray]))[:: max(1, len(fast_gray))]
    rng = np.random.default_rng(SEED)
    return [prepare(match_quantiles(reframe(read_image(path, "gray"), fraction), reference, rng), settings) for path in ixi]


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_line(__file__, __doc__)
    parser.add_argument("--fastmri-only", action="store_true", help="fit on the fastMRI training slices alone")
    parser.add_argument("config", nargs="?", default=FAST_IXI, help="config file (default: configs/fast_ixi.yaml)")
    arguments = parser.parse_args(argv)
    settings = load_config(arguments.config)
    fast_gray = [read_image(p, "gray") for p in load_data(settings, ("train",)).train.paths]
    prepared = [prepare(g, settings) for g in fast_gray]
    if not arguments.fastmri_only:
        prepared += harmonised_ixi(settings, fast_gray)
    model = Padim(settings).fit(as_batches(*stacked(prepared), settings.batch_size), progress=False)
    print(f"train {len(prepared)}: {validation_text(validation_metrics(model, synthetic_set(settings, DRAWS)))}", flush=True)
    print(f"train {len(prepared)}: {group_text(group_mean(fitted_run(settings, model)))}")


if __name__ == "__main__":
    main()
