"""Probe for docs/quality.md: which parts of ``data.align: moments`` matter.

Runs a config with ``data.align: moments`` restricted to some of its three parts (translation is
always on; scale and rotation can be switched off through the constants of :mod:`utils.padim.align`),
and prints for each variant the synthetic-lesion validation numbers (experiments/synthetic_val.py) and
the test-split means ((A) AUROC / AP, (B), (C), Dice at the validation threshold). Writes nothing.

    python experiments/align_probe.py [--draws N] configs/ablation/j1_f3_align.yaml [variant ...]

Variants: ``full`` (the key as it is), ``no_rotation``, ``no_scale``, ``translation``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import command_line, fitted_run, group_mean, group_text, validation_text  # noqa: E402
from experiments.synthetic_val import SyntheticSet, synthetic_set, validation_metrics  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.padim import align  # noqa: E402

VARIANTS = {
    "full": {},
    "no_rotation": {"MIN_ELONGATION": float("inf")},
    "no_scale": {"SCALE_RANGE": (1.0, 1.0)},
    "translation": {"MIN_ELONGATION": float("inf"), "SCALE_RANGE": (1.0, 1.0)},
}


def run_variant(settings: Settings, variant: str, synthetic: SyntheticSet) -> str:
    """Fit and score with the alignment's constants set as ``variant`` says (restored afterwards)."""
    defaults = {name: getattr(align, name) for name in ("MIN_ELONGATION", "SCALE_RANGE")}
    for name, value in VARIANTS[variant].items():
        setattr(align, name, value)
    try:
        run = fitted_run(settings)
        v = validation_metrics(run.model, synthetic)
        mean = group_mean(run)
    finally:
        for name, value in defaults.items():
            setattr(align, name, value)
    return f"{variant}\t{validation_text(v)}\t{group_text(mean, dice=True)}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_line(__file__, __doc__, draws=10)
    parser.add_argument("config", help="a config with data.align: moments")
    parser.add_argument("variants", nargs="*", metavar="variant", help=f"of {', '.join(VARIANTS)} (default: all)")
    arguments = parser.parse_args(argv)
    if unknown := set(arguments.variants) - set(VARIANTS):
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; allowed: {', '.join(VARIANTS)}")
    settings = load_config(arguments.config)
    synthetic = synthetic_set(settings, arguments.draws)
    for name in arguments.variants or list(VARIANTS):
        print(run_variant(settings, name, synthetic), flush=True)


if __name__ == "__main__":
    main()
