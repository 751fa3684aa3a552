"""Probe for docs/quality.md (issue 18, lever 3): an ensemble of backbones.

Fits the config once per backbone (efficientnet_lite0/1/2, all channels each), standardises each
model's maps by the mean and standard deviation of its normal validation maps inside their brain
masks (validation data only), averages the standardised maps, and reports the synthetic-lesion
validation numbers (docs/synthetic_val.py) and the test-split means of the averaged maps (image
score: the config's, inside the head; threshold: 99th percentile of the averaged validation maps).

    python docs/ensemble_probe.py [--draws N] configs/fast_ixi.yaml [backbone ...]

Writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_val import synthetic_set, draws_and_arguments  # noqa: E402

from utils.evaluation import metrics as M  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.evaluation import Evaluation, metrics_table, reference_maps  # noqa: E402
from utils.padim.scoring import image_scores  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def member(settings, backbone: str, val_set) -> dict:
    """One backbone: its standardised validation, synthetic and test maps."""
    evaluation = Evaluation(settings.replace(backbone=backbone, target_dimension=None, output_dimension=None))
    evaluation.load_data()
    model = evaluation.fit(progress=False)
    ref_maps, regions, _ = reference_maps(model, evaluation.bundle.val, evaluation.settings)
    mean, std = float(ref_maps[regions].mean()), float(ref_maps[regions].std())
    z = lambda maps: (maps - mean) / std  # noqa: E731
    clean, sick = val_set[0], val_set[1]
    groups = evaluation.score(progress=False)
    return {"reference": z(ref_maps), "regions": regions, "clean": z(model.score(clean, progress=False).maps),
            "sick": z(model.score(sick, progress=False).maps), "groups": {n: z(g.maps) for n, g in groups.items()},
            "scored": groups}


def main(config: str, backbones: list[str], draws: int) -> None:
    settings = load_config(config)
    val_set = synthetic_set(settings, draws)
    members = [member(settings, b, val_set) for b in backbones]
    average = lambda key: np.mean([m[key] for m in members], axis=0)  # noqa: E731
    _, _, masks, brain_clean, brain_sick = val_set
    sick, clean, m = average("sick"), average("clean"), masks.numpy()
    a_auroc, a_ap = M.pixel_metrics(sick, m)
    b_auroc = M.pixel_metrics(sick, m, brain_sick.numpy() | m)[0]
    s_sick = image_scores(torch.from_numpy(sick), settings.image_score, brain_sick | masks).numpy()
    s_clean = image_scores(torch.from_numpy(clean), settings.image_score, brain_clean).numpy()
    c_auroc = M.image_auroc(s_sick, s_clean)
    threshold = M.normal_threshold(average("reference"), members[0]["regions"])
    groups = {}
    for name, group in members[0]["scored"].items():
        maps = np.mean([mem["groups"][name] for mem in members], axis=0).astype(np.float32)
        scores = image_scores(torch.from_numpy(maps), settings.image_score, torch.from_numpy(group.heads)).numpy()
        groups[name] = dataclasses.replace(group, maps=maps, scores=scores.astype(np.float64))
    mean = metrics_table(groups, threshold).set_index("group").loc["mean"]
    print(f"{'+'.join(b.split('_')[1] for b in backbones)}\tval A {a_auroc:.3f} AP {a_ap:.3f} B {b_auroc:.3f} "
          f"C {c_auroc:.3f} mean {(a_auroc + a_ap + b_auroc + c_auroc) / 4:.3f}\ttest A {mean.A_auroc:.3f} "
          f"AP {mean.A_ap:.3f} B {mean.B_auroc:.3f} C {mean.C_auroc:.3f} dice@val {mean.dice_val_threshold:.3f}", flush=True)


if __name__ == "__main__":
    draws, arguments = draws_and_arguments(sys.argv[1:], default=10)
    main(arguments[0], arguments[1:] or list(BACKBONES), draws)
