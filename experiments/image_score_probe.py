"""Probe for docs/quality.md (issue 18, lever 2): image scores for protocol (C).

For one config, compares image scores on the synthetic-lesion validation set (docs/synthetic_val.py,
clean against lesioned normal_val slices) and on the test splits ((C): each group against the
normal test slices, mean over the groups):

- ``max``: the map's maximum inside the head (the repository's ``image_score: max``);
- ``top<k>``: the mean of the highest ``k`` % of the map's pixels inside the head;
- ``gauss``: an image-level Gaussian on globally average-pooled patch embeddings (Rippel et al.
  2020), Ledoit-Wolf covariance (130 images for 176 dimensions), Mahalanobis distance;
- ``max+gauss``: the sum of both, each standardised by its mean and standard deviation over the
  training images (no validation or test statistics).

    python docs/image_score_probe.py [--draws N] configs/fast_ixi.yaml

Prints one line per score; writes nothing.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sklearn.covariance import LedoitWolf  # noqa: E402
from synthetic_val import synthetic_set, draws_and_arguments  # noqa: E402

from utils.evaluation import metrics as M  # noqa: E402
from utils.padim.align import align_batch  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import NORMAL, ImageSet, Item, make_loader  # noqa: E402
from utils.evaluation import Evaluation  # noqa: E402

TOP_PERCENT = (0.1, 1.0, 5.0)


def top_mean(maps: np.ndarray, regions: np.ndarray, percent: float) -> np.ndarray:
    """Mean of the highest ``percent`` % of each map's pixels inside its region."""
    scores = []
    for image_map, region in zip(maps, regions):
        values = np.sort(image_map[region] if region.any() else image_map.ravel())
        scores.append(values[-max(1, int(round(len(values) * percent / 100))):].mean())
    return np.asarray(scores)


def pooled(model, images: torch.Tensor) -> np.ndarray:
    """Globally average-pooled patch embeddings ``(N, d)`` (in the model's aligned frame, if any)."""
    with torch.inference_mode():
        out = [model.embed(align_batch(batch, model.settings.data.align)[0]).mean(dim=(2, 3)).double().cpu() for batch in images.split(32)]
    return torch.cat(out).numpy()


def image_set_tensor(paths: list[str], settings) -> torch.Tensor:
    return torch.cat([b["image"] for b in make_loader(ImageSet("x", [Item(p) for p in paths], settings), settings)])


class Scorer:
    """Every image score of this probe, fitted on the training images."""

    def __init__(self, model, train_images: torch.Tensor):
        self.model = model
        features = pooled(model, train_images)
        self.gauss = LedoitWolf().fit(features)
        train = model.score(train_images, progress=False).maps
        self.reference = {"max": self._max(train, np.ones_like(train, dtype=bool)), "gauss": self._gauss(train_images)}

    def _max(self, maps, regions):
        return top_mean(maps, regions, 0.0)

    def _gauss(self, images):
        return np.sqrt(self.gauss.mahalanobis(pooled(self.model, images)))

    def all(self, images: torch.Tensor, maps: np.ndarray, regions: np.ndarray) -> dict[str, np.ndarray]:
        scores = {"max": self._max(maps, regions)}
        scores |= {f"top{p:g}": top_mean(maps, regions, p) for p in TOP_PERCENT}
        scores["gauss"] = self._gauss(images)
        z = {k: (scores[k] - self.reference[k].mean()) / self.reference[k].std() for k in ("max", "gauss")}
        scores["max+gauss"] = z["max"] + z["gauss"]
        return scores


def main(config: str, draws: int) -> None:
    evaluation = Evaluation(load_config(config))
    settings = evaluation.settings
    evaluation.load_data()
    model = evaluation.fit(progress=False)
    scorer = Scorer(model, image_set_tensor(evaluation.bundle.train.paths, settings))
    clean, sick, masks, brain_clean, brain_sick = synthetic_set(settings, draws)
    val_sick = scorer.all(sick, model.score(sick, progress=False).maps, (brain_sick | masks).numpy())
    val_clean = scorer.all(clean, model.score(clean, progress=False).maps, brain_clean.numpy())
    groups = evaluation.score(progress=False)
    test = {name: scorer.all(image_set_tensor(g.paths, settings), g.maps, g.heads) for name, g in groups.items()}
    for key in val_sick:
        val_c = M.image_auroc(val_sick[key], val_clean[key])
        test_c = np.mean([M.image_auroc(s[key], test[NORMAL][key]) for name, s in test.items() if name != NORMAL])
        print(f"{key}\tval C {val_c:.3f}\ttest (C) mean {test_c:.3f}", flush=True)


if __name__ == "__main__":
    draws, arguments = draws_and_arguments(sys.argv[1:], default=10)
    main(arguments[0], draws)
