"""Probe for docs/quality.md (issue 18, lever 4): the operating point.

The evaluation's decision threshold is the 99th percentile of the normal validation maps' pixels
inside their brain masks. For one config this prints (1) how the map scale of the 15 normal
validation slices compares with the 30 normal test slices (percentiles inside the region, and the
fraction of normal test pixels above the validation threshold, 1 % if both were alike), and (2) for
threshold rules taken from the validation maps only (percentiles of the clean validation pixels), the
Dice on the synthetic-lesion validation set (experiments/synthetic_val.py) and the mean Dice over the test
groups at that threshold (as ``dice_val_threshold``). Writes nothing.

    python experiments/threshold_probe.py [--draws N] configs/fast_ixi.yaml
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import fitted_run, probe_arguments  # noqa: E402
from utils.evaluation.reference import reference_maps  # noqa: E402
from experiments.synthetic_val import synthetic_set  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import NORMAL  # noqa: E402
from utils.evaluation import metrics as M  # noqa: E402

PERCENTILES = (90.0, 95.0, 97.0, 98.0, 99.0, 99.5, 99.7, 99.9)


def scale_report(val_maps, val_regions, normal) -> None:
    """Percentiles of normal validation and normal test pixels inside their regions."""
    val = val_maps[val_regions]
    test = normal.maps[normal.heads]
    for name, values in (("normal_val (brain)", val), ("normal_test (head)", test)):
        p = np.percentile(values, [50, 90, 99, 99.9])
        print(f"{name}: {len(values)} px, median {p[0]:.2f}, p90 {p[1]:.2f}, p99 {p[2]:.2f}, p99.9 {p[3]:.2f}")
    threshold = np.percentile(val, 99.0)
    print(f"normal test pixels above the validation p99 ({threshold:.2f}): {np.mean(test > threshold):.2%}")
    per_image = [float(np.mean(m[h] > threshold)) for m, h in zip(normal.maps, normal.heads)]
    print(f"per normal test slice, pixels above it: median {np.median(per_image):.2%}, max {np.max(per_image):.2%}")


def main(argv: Optional[list[str]] = None) -> None:
    arguments = probe_arguments(__file__, __doc__, argv)
    run = fitted_run(load_config(arguments.config))
    model, settings = run.model, run.settings
    val_maps, val_regions = reference_maps(model, run.bundle.val, settings)
    run.score(progress=False)
    print(f"validation region: {run.reference.region_kind}")
    groups = run.units.groups
    scale_report(val_maps, val_regions, groups[NORMAL])
    synthetic = synthetic_set(settings, arguments.draws)
    sick_maps = model.score(synthetic.batches(True, settings.batch_size), progress=False).maps
    masks, brains = synthetic.masks.numpy(), (synthetic.brain_sick | synthetic.masks).numpy()
    pathologies = [g for name, g in groups.items() if name != NORMAL]
    for percentile in PERCENTILES:
        threshold = float(np.percentile(val_maps[val_regions], percentile))
        val_dice = M.dice_at(sick_maps, masks, threshold, brains)
        dice = [M.dice_at(g.maps, g.masks, threshold, g.heads) for g in pathologies]
        zero = sum(d == 0 for d in dice)
        print(f"p{percentile:g} threshold {threshold:.2f}\tval Dice {val_dice:.3f}\ttest Dice@val mean {np.mean(dice):.3f} "
              f"({zero} of {len(dice)} groups 0)", flush=True)
    print("test groups' best thresholds (median over groups): "
          f"{np.median([M.best_dice(g.maps, g.masks, g.heads)[1] for g in pathologies]):.2f}")


if __name__ == "__main__":
    main()
