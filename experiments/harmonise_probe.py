"""Probe for docs/quality.md (not a feature): make the 581 IXI training slices look like fastMRI and
train on all 711 images, then report validation (synthetic lesions) and test numbers.

The study's IXI slices differ from fastMRI in framing (233 x 197 px, the head filling a different
part of the frame) and intensity (exact-zero background where fastMRI has noise, a brighter brain).
Per IXI slice:

1. framing: crop/pad a square around the head (utils.preprocess.foreground_mask) so that the head's
   larger side takes the same fraction of the frame as the median fastMRI training slice;
2. intensity: quantile matching to the pooled intensities of the fastMRI training slices, with ties
   broken at random (seeded), so the zero background receives fastMRI's background value spread.

The model is the chosen configuration (configs/fast_ixi.yaml) fitted on the harmonised IXI slices
plus the 130 fastMRI normals; ``--fastmri-only`` fits the same code on the 130 alone (a check that the
probe reproduces the configuration's numbers).

    python docs/harmonise_probe.py [--fastmri-only]      # ~1.5 min on 2 cores
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import synthetic_val as SV  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import load_data  # noqa: E402
from utils.evaluation import run_evaluation  # noqa: E402
from utils.padim.model import Padim  # noqa: E402
from utils.data.preprocess import foreground_mask, prepare, read_image  # noqa: E402

CONFIG = os.path.join(os.path.dirname(HERE), "configs", "fast_ixi.yaml")
SEED = 0


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


def main(fastmri_only: bool) -> None:
    settings = load_config(CONFIG).replace(results_dir=os.path.join(os.path.dirname(HERE), "results"))
    fast = load_data(settings, ("train",)).train.paths
    fast_gray = [read_image(p, "gray") for p in fast]
    images = [prepare(g, settings)[0] for g in fast_gray]
    if not fastmri_only:
        ixi = load_data(settings.replace(data={"train_splits": ["ixi_normal_train"]}), ("train",)).train.paths
        fraction = float(np.median([head_fraction(g) for g in fast_gray]))
        reference = np.sort(np.concatenate([g.ravel() for g in fast_gray]))[:: max(1, len(fast_gray))]
        rng = np.random.default_rng(SEED)
        for path in ixi:
            gray = match_quantiles(reframe(read_image(path, "gray"), fraction), reference, rng)
            images.append(prepare(gray, settings)[0])
    train = torch.stack(images)
    model = Padim(settings).fit(train, progress=False)
    v = SV.validation_metrics(model, settings, 10)
    mean = (v["A_auroc"] + v["A_ap"] + v["B_auroc"] + v["C_auroc"]) / 4
    print(f"train {len(train)}: val A {v['A_auroc']:.3f} AP {v['A_ap']:.3f} B {v['B_auroc']:.3f} C {v['C_auroc']:.3f} mean {mean:.3f}", flush=True)
    row = run_evaluation(settings, model=model, progress=False, figures=False, save_model=False).table.set_index("group").loc["mean"]
    print(f"train {len(train)}: test A {row['A_auroc']:.3f} AP {row['A_ap']:.3f} B {row['B_auroc']:.3f} C {row['C_auroc']:.3f}")


if __name__ == "__main__":
    main("--fastmri-only" in sys.argv[1:])
