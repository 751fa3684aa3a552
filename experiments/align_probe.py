"""Probe for docs/quality.md: which parts of ``data.align: moments`` matter.

Runs a config with ``data.align: moments`` restricted to some of its three parts (translation is
always on; scale and rotation can be switched off through the constants of :mod:`utils.padim.align`),
and prints for each variant the synthetic-lesion validation numbers (docs/synthetic_val.py) and
the test-split means ((A) AUROC / AP, (B), (C), Dice at the validation threshold). Writes nothing.

    python docs/align_probe.py [--draws N] configs/ablation/j1_f3_align.yaml [variant ...]

Variants: ``full`` (the key as it is), ``no_rotation``, ``no_scale``, ``translation``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_val import validation_metrics, draws_and_arguments  # noqa: E402

from utils import align  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.evaluation import Evaluation  # noqa: E402

VARIANTS = {
    "full": {},
    "no_rotation": {"MIN_ELONGATION": float("inf")},
    "no_scale": {"SCALE_RANGE": (1.0, 1.0)},
    "translation": {"MIN_ELONGATION": float("inf"), "SCALE_RANGE": (1.0, 1.0)},
}


def run(config: str, variant: str, draws: int) -> str:
    defaults = {name: getattr(align, name) for name in ("MIN_ELONGATION", "SCALE_RANGE")}
    for name, value in VARIANTS[variant].items():
        setattr(align, name, value)
    try:
        evaluation = Evaluation(load_config(config))
        evaluation.load_data()
        model = evaluation.fit(progress=False)
        v = validation_metrics(model, evaluation.settings, draws)
        evaluation.score(progress=False)
        mean = evaluation.compute_metrics().set_index("group").loc["mean"]
    finally:
        for name, value in defaults.items():
            setattr(align, name, value)
    val_mean = (v["A_auroc"] + v["A_ap"] + v["B_auroc"] + v["C_auroc"]) / 4
    return (f"{variant}\tval A {v['A_auroc']:.3f} AP {v['A_ap']:.3f} B {v['B_auroc']:.3f} C {v['C_auroc']:.3f} "
            f"mean {val_mean:.3f}\ttest A {mean.A_auroc:.3f} AP {mean.A_ap:.3f} B {mean.B_auroc:.3f} "
            f"C {mean.C_auroc:.3f} dice@val {mean.dice_val_threshold:.3f}")


if __name__ == "__main__":
    draws, arguments = draws_and_arguments(sys.argv[1:], default=10)
    config, variants = arguments[0], arguments[1:] or list(VARIANTS)
    for name in variants:
        print(run(config, name, draws), flush=True)
