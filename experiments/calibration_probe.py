"""Probe for docs/quality.md (not a feature): calibrate every pixel of the anomaly map by the
held-out maps of the training normals, and report validation (synthetic lesions) and test numbers.

Five-fold: PaDiM is fitted on 4/5 of the training images and scores the other 1/5, so each of the
130 fastMRI normals gets an out-of-sample map; their per-pixel mean (and standard deviation) is
the normal level of that pixel. Variants: ``sub`` (map - mean) and ``z`` ((map - mean) / std, the
std floored at a fraction of its median). The final model is fitted on all training images.

    python docs/calibration_probe.py [configs/fast_ixi.yaml]      # ~2 min on 2 cores
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import synthetic_val as SV  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import load_data, make_loader  # noqa: E402
from utils.evaluation import run_evaluation  # noqa: E402
from utils.padim.model import Padim, ScoreResult  # noqa: E402
from utils.padim.scoring import image_scores  # noqa: E402

FOLDS = 5


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


def main(config: str) -> None:
    settings = load_config(config).replace(results_dir=os.path.join(os.path.dirname(HERE), "results"))
    train = load_data(settings, ("train",)).train
    images = torch.cat([batch["image"] for batch in make_loader(train, settings)])
    fold = np.arange(len(images)) % FOLDS
    held_out = np.zeros((len(images), settings.image_size, settings.image_size), np.float32)
    started = time.perf_counter()
    for k in range(FOLDS):
        model = Padim(settings).fit(images[fold != k], progress=False)
        held_out[fold == k] = model.score(images[fold == k], progress=False).maps
    print(f"{FOLDS}-fold held-out maps of {len(images)} training images: {time.perf_counter() - started:.0f} s")
    level, spread = held_out.mean(0), held_out.std(0)
    for mode, floor in (("sub", None), ("z", 0.5), ("z", 1.0)):
        model = CalibratedPadim(settings).fit(images, progress=False)
        model.level = level
        model.spread = None if floor is None else np.maximum(spread, np.median(spread) * floor)
        v = SV.validation_metrics(model, settings, 10)
        mean = (v["A_auroc"] + v["A_ap"] + v["B_auroc"] + v["C_auroc"]) / 4
        label = f"{mode} {floor or 0}"
        print(f"{label} val A {v['A_auroc']:.3f} AP {v['A_ap']:.3f} B {v['B_auroc']:.3f} C {v['C_auroc']:.3f} mean {mean:.3f}")
        row = run_evaluation(settings, model=model, progress=False, figures=False, save_model=False).table.set_index("group").loc["mean"]
        print(f"{label} test A {row['A_auroc']:.3f} AP {row['A_ap']:.3f} B {row['B_auroc']:.3f} C {row['C_auroc']:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(HERE), "configs", "fast_ixi.yaml"))
