"""What the scripts in experiments/ share: their command line, a run of a config, the network
inputs with the data path's head estimates, the normal validation maps and the lines they print.

Only public names of :mod:`utils` are used here and in every script beside this one.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import pandas as pd
import torch

from utils.config import Settings
from utils.data.preprocess import Prepared
from utils.evaluation import Run
from utils.padim import Padim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The chosen configuration for the study's data (docs/quality.md).
FAST_IXI = os.path.join(ROOT, "configs", "fast_ixi.yaml")


def command_line(script: str, doc: str, draws: Optional[int] = None) -> argparse.ArgumentParser:
    """A parser for ``python experiments/<script>.py`` whose help is the script's docstring, with
    ``--draws N`` (synthetic lesions per validation slice) when ``draws`` gives its default."""
    parser = argparse.ArgumentParser(prog=f"python {os.path.relpath(script, ROOT)}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if draws is not None:
        parser.add_argument("--draws", type=int, default=draws, help=f"lesions per validation slice (default {draws})")
    return parser


def probe_arguments(script: str, doc: str, argv: Optional[list[str]], draws: int = 10) -> argparse.Namespace:
    """``[--draws N] config``: the command line of a probe that studies one config."""
    parser = command_line(script, doc, draws)
    parser.add_argument("config", help="config file (YAML)")
    return parser.parse_args(argv)


def stacked(prepared: Sequence[Prepared]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Network inputs ``(N, 3, S, S)`` of prepared images and their heads ``(N, S, S)`` (None when
    the settings estimate none)."""
    heads = [p.head for p in prepared]
    return torch.stack([p.image for p in prepared]), None if heads[0] is None else torch.stack(heads)


def as_batches(images: torch.Tensor, heads: Optional[torch.Tensor], batch_size: int) -> list[dict]:
    """Batches as :meth:`Padim.fit` and :meth:`Padim.score` take them, with the heads the data path
    estimated, so that the model aligns and masks these images as the evaluation's would."""
    if heads is None:
        return [{"image": chunk} for chunk in images.split(batch_size)]
    return [{"image": chunk, "foreground": head} for chunk, head in zip(images.split(batch_size), heads.split(batch_size))]


def fitted_run(settings: Settings, model: Optional[Padim] = None) -> Run:
    """A run of ``settings`` with every split loaded and PaDiM fitted on its training images, or
    with ``model`` (fitted by the caller, possibly on other images: nothing is saved, so no results
    folder names it after the config's training files)."""
    run = Run(settings)
    run.load_data()
    if model is None:
        run.fit(progress=False)
    else:
        run.model = model
    return run


def group_mean(run: Run) -> pd.Series:
    """Score the run's test splits; its metrics table's row ``mean`` (the mean over the pathology groups)."""
    run.score(progress=False)
    return run.compute_metrics().set_index("group").loc["mean"]


def validation_text(v: dict[str, float]) -> str:
    """The four synthetic-lesion numbers and their mean (the selection rule of docs/quality.md)."""
    mean = (v["A_auroc"] + v["A_ap"] + v["B_auroc"] + v["C_auroc"]) / 4
    return f"val A {v['A_auroc']:.3f} AP {v['A_ap']:.3f} B {v['B_auroc']:.3f} C {v['C_auroc']:.3f} mean {mean:.3f}"


def group_text(mean: pd.Series, dice: bool = False) -> str:
    """The test splits' means of (A) AUROC / AP, (B), (C) and, with ``dice``, Dice at the validation threshold."""
    text = f"test A {mean['A_auroc']:.3f} AP {mean['A_ap']:.3f} B {mean['B_auroc']:.3f} C {mean['C_auroc']:.3f}"
    return text + (f" dice@val {mean['dice_val_threshold']:.3f}" if dice else "")
