"""Probe for docs/quality.md (issue 18, lever 2): image scores for protocol (C).

For one config, compares image scores on the synthetic-lesion validation set (experiments/synthetic_val.py,
clean against lesioned normal_val slices) and on the test splits ((C): each group against the
normal test slices, mean over the groups):

- ``max``: the map's maximum inside the head (the repository's ``image_score: max``);
- ``top<k>``: the mean of the highest ``k`` % of the map's pixels inside the head;
- ``gauss``: an image-level Gaussian on globally average-pooled patch embeddings (Rippel et al.
  2020), Ledoit-Wolf covariance (130 images for 176 dimensions), Mahalanobis distance;
- ``max+gauss``: the sum of both, each standardised by its mean and standard deviation over the
  training images (no validation or test statistics).

    python experiments/image_score_probe.py [--draws N] configs/fast_ixi.yaml

Prints one line per score; writes nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import fitted_run, probe_arguments  # noqa: E402
from experiments.synthetic_val import synthetic_set  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.data import NORMAL, ImageSet, Item, Loader  # noqa: E402
from utils.evaluation import metrics as M  # noqa: E402
from utils.padim import Padim  # noqa: E402
from utils.padim.align import align_batch  # noqa: E402

TOP_PERCENT = (0.1, 1.0, 5.0)


def top_mean(maps: np.ndarray, regions: np.ndarray, percent: float) -> np.ndarray:
    """Mean of the highest ``percent`` % of each map's pixels inside its region."""
    scores = []
    for image_map, region in zip(maps, regions):
        values = np.sort(image_map[region] if region.any() else image_map.ravel())
        scores.append(values[-max(1, int(round(len(values) * percent / 100))):].mean())
    return np.asarray(scores)


def pooled(model: Padim, batches: list[dict]) -> np.ndarray:
    """Globally average-pooled patch embeddings ``(N, d)`` (in the model's aligned frame, if any)."""
    mode = model.settings.data.align
    with torch.inference_mode():
        out = [model.embed(align_batch(b["image"], mode, b.get("foreground"))[0]).mean(dim=(2, 3)).double().cpu()
               for b in batches]
    return torch.cat(out).numpy()


def loaded(paths: list[str], settings: Settings) -> list[dict]:
    """The images at ``paths`` as model input (with the data path's head estimates)."""
    return list(Loader(ImageSet("x", [Item(p) for p in paths], settings), settings))


class Scorer:
    """Every image score of this probe, fitted on the training images."""

    def __init__(self, model: Padim, train: list[dict]):
        self.model = model
        self.gauss = LedoitWolf().fit(pooled(model, train))
        maps = model.score(train, progress=False).maps
        self.reference = {"max": top_mean(maps, np.ones_like(maps, dtype=bool), 0.0), "gauss": self.gauss_scores(train)}

    def gauss_scores(self, batches: list[dict]) -> np.ndarray:
        return np.sqrt(self.gauss.mahalanobis(pooled(self.model, batches)))

    def all(self, batches: list[dict], maps: np.ndarray, regions: np.ndarray) -> dict[str, np.ndarray]:
        scores = {"max": top_mean(maps, regions, 0.0)}
        scores |= {f"top{p:g}": top_mean(maps, regions, p) for p in TOP_PERCENT}
        scores["gauss"] = self.gauss_scores(batches)
        z = {k: (scores[k] - self.reference[k].mean()) / self.reference[k].std() for k in ("max", "gauss")}
        scores["max+gauss"] = z["max"] + z["gauss"]
        return scores


def main(argv: Optional[list[str]] = None) -> None:
    arguments = probe_arguments(__file__, __doc__, argv)
    run = fitted_run(load_config(arguments.config))
    model, settings = run.model, run.settings
    scorer = Scorer(model, list(Loader(run.bundle.train, settings)))
    synthetic = synthetic_set(settings, arguments.draws)
    sick, clean = synthetic.batches(True, settings.batch_size), synthetic.batches(False, settings.batch_size)
    val_sick = scorer.all(sick, model.score(sick, progress=False).maps, (synthetic.brain_sick | synthetic.masks).numpy())
    val_clean = scorer.all(clean, model.score(clean, progress=False).maps, synthetic.brain_clean.numpy())
    run.score(progress=False)
    test = {name: scorer.all(loaded(g.paths, settings), g.maps, g.heads) for name, g in run.units.groups.items()}
    for key in val_sick:
        val_c = M.image_auroc(val_sick[key], val_clean[key])
        test_c = np.mean([M.image_auroc(s[key], test[NORMAL][key]) for name, s in test.items() if name != NORMAL])
        print(f"{key}\tval C {val_c:.3f}\ttest (C) mean {test_c:.3f}", flush=True)


if __name__ == "__main__":
    main()
