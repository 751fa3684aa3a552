"""Probe for docs/quality.md (issue 18, lever 3): an ensemble of backbones.

Fits the config once per backbone (efficientnet_lite0/1/2, all channels each), standardises each
model's maps by the mean and standard deviation of its normal validation maps inside their brain
masks (validation data only), averages the standardised maps, and reports the synthetic-lesion
validation numbers (experiments/synthetic_val.py) and the test-split means of the averaged maps (image
score: the config's, inside the head; threshold: 99th percentile of the averaged validation maps).

    python experiments/ensemble_probe.py [--draws N] configs/fast_ixi.yaml [backbone ...]

Writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import command_line, fitted_run, group_text, validation_text  # noqa: E402
from utils.evaluation.reference import reference_maps  # noqa: E402
from experiments.synthetic_val import SyntheticSet, lesion_metrics, synthetic_set  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.evaluation import metrics as M  # noqa: E402
from utils.evaluation.images import GroupScores, metrics_table  # noqa: E402
from utils.padim.scoring import image_scores  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def member(settings: Settings, backbone: str, synthetic: SyntheticSet) -> dict:
    """One backbone: its standardised validation, synthetic and test maps."""
    run = fitted_run(settings.replace(backbone=backbone, target_dimension=None, output_dimension=None))
    model, size = run.model, settings.batch_size
    ref_maps, regions = reference_maps(model, run.bundle.val, run.settings)
    mean, std = float(ref_maps[regions].mean()), float(ref_maps[regions].std())

    def z(maps: np.ndarray) -> np.ndarray:
        return (maps - mean) / std

    run.score(progress=False)
    groups = run.units.groups
    return {"reference": z(ref_maps), "regions": regions,
            "clean": z(model.score(synthetic.batches(False, size), progress=False).maps),
            "sick": z(model.score(synthetic.batches(True, size), progress=False).maps),
            "groups": {n: z(g.maps) for n, g in groups.items()}, "scored": groups}


def averaged_groups(members: list[dict], image_score: str) -> dict[str, GroupScores]:
    """The first member's scored test groups with the members' mean maps and their image scores."""
    groups = {}
    for name, group in members[0]["scored"].items():
        maps = np.mean([m["groups"][name] for m in members], axis=0).astype(np.float32)
        scores = image_scores(torch.from_numpy(maps), image_score, torch.from_numpy(group.heads)).numpy()
        groups[name] = dataclasses.replace(group, maps=maps, scores=scores.astype(np.float64))
    return groups


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_line(__file__, __doc__, draws=10)
    parser.add_argument("config")
    parser.add_argument("backbones", nargs="*", metavar="backbone", help=f"default: {' '.join(BACKBONES)}")
    arguments = parser.parse_args(argv)
    settings = load_config(arguments.config)
    backbones = arguments.backbones or list(BACKBONES)
    synthetic = synthetic_set(settings, arguments.draws)
    members = [member(settings, b, synthetic) for b in backbones]

    def average(key: str) -> np.ndarray:
        return np.mean([m[key] for m in members], axis=0)

    v = lesion_metrics(average("sick"), average("clean"), synthetic, settings.image_score)
    threshold = M.normal_threshold(average("reference"), members[0]["regions"])
    mean = metrics_table(averaged_groups(members, settings.image_score), threshold).set_index("group").loc["mean"]
    print(f"{'+'.join(b.split('_')[-1] for b in backbones)}\t{validation_text(v)}\t{group_text(mean, dice=True)}", flush=True)


if __name__ == "__main__":
    main()
