"""One evaluation run, for 2-D images and NIfTI volumes alike, and the ``fit`` command's fit.

:class:`Run` runs the steps the notebook shows one by one (and :func:`run_evaluation` runs them
all, for ``python -m utils evaluate``), so both write the same files::

    run = Run(settings)                # single process, or one rank under torchrun
    run.load_data()                    # utils.data.load_data; names the run: results/<run-name>/
    run.fit(progress=True)             # Padim.fit on the training images (or Padim.load)
    run.score(progress=True)           # validation maps (threshold, colour scale), every test unit once
    run.compute_metrics()              # run.table: one row per group, then "mean" (images: and "all")
    run.make_figures()                 # AUROC bars and examples (images) or views (volumes)
    run.save()                         # metrics.csv, metrics.md, config.yaml, timings.json, model.pt, figures/

What differs between a 2-D image and a 3-D volume (the scoring unit, its metrics, its figures, its
own files) is in :class:`utils.evaluation.images.ImageUnits` and
:class:`utils.evaluation.volumes.VolumeUnits`. Maps are never normalised with test statistics, and
the threshold and colour scale never come from the images they are applied to: without a
validation split, a seeded held-out fraction of the training images serves (``data.val_fraction``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..boundary import one_warning_per_kind
from ..config import Settings
from ..data import SPLITS, DataBundle, files_read, fingerprint, load_data
from ..distributed import DistributedContext, distributed_fit, prepare_demo
from ..errors import DataError, ModelFileError
from ..files import check_replaceable, staged_folder, write_atomic
from ..padim import Padim
from .report import markdown, summary as summary_text
from .images import ImageUnits
from .naming import run_name
from .plotting import auroc_bar_plot, save_figure
from .reference import NormalReference, normal_reference
from .volumes import VolumeUnits


@dataclass
class Run:
    """One evaluation run (see the module docstring); ``ctx`` is this process's place under torchrun."""

    settings: Settings
    ctx: DistributedContext = field(default_factory=DistributedContext)
    name: str = ""
    directory: str = ""
    bundle: Optional[DataBundle] = None
    #: The format's own steps (:class:`ImageUnits` or :class:`VolumeUnits`), set with the data.
    units: ImageUnits | VolumeUnits | None = None
    model: Optional[Padim] = None
    model_source: str = ""
    model_path: Optional[str] = None  # the model file loaded instead of fitting
    reference: Optional[NormalReference] = None
    table: Optional[pd.DataFrame] = None
    #: One row per scoring unit where the format has one (volumes.csv), else None.
    unit_table: Optional[pd.DataFrame] = None
    figures: dict[str, Figure] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    #: :func:`utils.data.fingerprint` of every file the run reads and of the groups and pairs the split lists
    #: define (set with the data; part of the run name, checked again before the results are swapped in).
    data_fingerprint: str = ""

    def load_data(self, splits: Sequence[str] = SPLITS) -> DataBundle:
        """The data ``splits`` (every rank generates a demo set it needs first); names the run after
        the settings and the files it reads (:func:`utils.evaluation.naming.run_name`)."""
        started = time.perf_counter()
        prepare_demo(self.settings, self.ctx)
        with one_warning_per_kind():  # e.g. skipped images, non-binary masks: one line each, not one per file
            self.bundle = self.ctx.agree("loading the data", lambda: load_data(self.settings, splits))
        if "val" in splits and self.bundle.val is None:
            raise DataError("no validation images for the threshold and colour scale: set data.val_split (NIfTI: val rows "
                            "in the manifest), or data.val_fraction > 0 to hold out part of the training images")
        self.data_fingerprint = self._data_fingerprint()
        self.name = run_name(self.settings, self.data_fingerprint)
        self.directory = os.path.join(self.settings.results_dir, self.name)
        volumes = self.settings.data.format == "nifti"
        self.units = VolumeUnits(self.settings, self.name) if volumes else ImageUnits(self.settings)
        self.timings["load_data_s"] = round(time.perf_counter() - started, 3)
        self.notes.append(f"data: {self.bundle.summary()}; threshold from {self.bundle.val_description}")
        return self.bundle

    def _data_fingerprint(self) -> str:
        return fingerprint([self.bundle.train, self.bundle.val, *self.bundle.test.values()], layout=True)

    def inputs(self) -> list[str]:
        """The files the run read: its data and the model file it loaded."""
        data = files_read([self.bundle.train, self.bundle.val, *self.bundle.test.values()])
        return data + ([self.model_path] if self.model_path else [])

    def fit(self, progress: bool = True, model_path: Optional[str] = None) -> Optional[Padim]:
        """Fit PaDiM on the training set (sharded across the ranks under torchrun: the model on rank 0,
        None elsewhere), or load ``model_path``, checked against the settings and against the training
        files (the run is named after them)."""
        if self.bundle is None:
            self.load_data()
        started = time.perf_counter()
        train, trained_on = self.bundle.train, fingerprint([self.bundle.train])
        if model_path is None:
            model = Padim(self.settings)
            model.train_fingerprint, model.train_digests = trained_on, self.bundle.train_digests
            model.train_kind = self.bundle.train_kind
            self.model = distributed_fit(model, train, self.ctx, progress=progress)
            self.model_source = f"fitted on {train.summary()}"
            self.timings["train_images"] = len(train)
        else:
            model = Padim.load(model_path, self.settings)
            if model.train_fingerprint != trained_on:
                raise ModelFileError(f"{model_path} was fitted on other training images than this config's "
                                     f"{train.summary()} (fingerprint {model.train_fingerprint or 'unknown'} vs "
                                     f"{trained_on}): evaluate it with the config and data it was fitted on, "
                                     "or refit without --model")
            self.model, self.model_source, self.model_path = model, f"loaded from {model_path}", model_path
        self.timings["fit_s"] = round(time.perf_counter() - started, 3)
        return self.model

    def score(self, progress: bool = True) -> None:
        """Maps of the normal validation images (threshold, colour scale), then every test unit once."""
        if self.model is None:
            raise RuntimeError("call fit() before score()")
        bundle, settings = self.bundle, self.model.settings
        started = time.perf_counter()
        units = self.units.count(bundle)
        bar = tqdm(total=len(bundle.val) + units, desc="score", disable=not progress, unit="img", leave=False)
        with one_warning_per_kind(), bar:
            self.reference = normal_reference(self.model, bundle.val, bundle.val_description, settings, bar)
            self.units.score(self.model, bundle, self.reference, bar)
        seconds = time.perf_counter() - started
        self.timings.update({"score_s": round(seconds, 3), f"{self.units.unit}s_scored": units,
                             "units_per_second": round(units / max(seconds, 1e-9), 2)})

    def compute_metrics(self) -> pd.DataFrame:
        """The metrics table (also ``self.table``; per-unit rows in ``self.unit_table`` where the format has them)."""
        if self.reference is None:
            raise RuntimeError("call score() before compute_metrics()")
        started = time.perf_counter()
        self.table, self.unit_table, notes = self.units.table(self.reference)
        self.notes += notes
        self.timings["metrics_s"] = round(time.perf_counter() - started, 3)
        return self.table

    def make_figures(self) -> dict[str, Figure]:
        """``{"auroc": AUROC bars per group, ...}`` and the format's own figures, as matplotlib figures."""
        if self.table is None:
            self.compute_metrics()
        started = time.perf_counter()
        s = self.settings
        self.figures = {"auroc": auroc_bar_plot(self.table, title=f"AUROC per group: {s.backbone} ({s.weights})")}
        self.figures |= self.units.figures(self.reference)
        self.timings["figures_s"] = round(time.perf_counter() - started, 3)
        return self.figures

    def save(self, save_model: bool = True, figures: bool = True, maps: bool = True) -> str:
        """Write the results folder as a whole (:func:`write_results`); returns the folder."""
        if self.table is None:
            raise RuntimeError("call compute_metrics() before save()")
        if figures and not self.figures:
            self.make_figures()
        self.written = write_results(self, save_model, figures, maps)
        return self.directory

    def summary(self) -> str:
        """Plain-text tables, notes, timings and where the results went (what ``python -m utils evaluate`` prints)."""
        return summary_text(self)

    def publish_figures(self, folder: str = "sources", prefix: str = "demo_") -> list[str]:
        """Save the figures as PNGs in ``folder`` (the repository's ``sources/``), demo data only:
        real data (the study's fastMRI images) may not be redistributed, so for any other data
        format nothing is written and ``[]`` is returned."""
        if self.settings.data.format != "demo":
            self.notes.append(f"figures not copied to {folder}/: only demo-data figures may be committed")
            return []
        if not self.figures:
            self.make_figures()
        return [save_figure(fig, os.path.join(folder, f"{prefix}{name}.png")) for name, fig in self.figures.items()]


def write_results(run: Run, save_model: bool, figures: bool, maps: bool) -> list[str]:
    """Write ``run``'s folder as a whole (:func:`utils.files.staged_folder`: an earlier run's folder of
    the same name is replaced, never mixed with these files, unless it holds a user's own files):
    metrics.csv, metrics.md, config.yaml, model.pt, figures/, the format's own files (volumes.csv,
    maps/) and timings.json. Returns the paths written."""
    started = time.perf_counter()
    csv = {"float_format": "%.6f", "na_rep": "nan", "index": False}
    texts = {"metrics.csv": run.table.to_csv(**csv), "metrics.md": markdown(run),
             "config.yaml": f"# settings of run {run.name}\n" + yaml.safe_dump(run.settings.to_dict(), sort_keys=False)}
    if run.unit_table is not None:
        texts[f"{run.units.unit}s.csv"] = run.unit_table.to_csv(**csv)
    try:
        with staged_folder(run.directory, "evaluate", inputs=run.inputs()) as folder:
            names = [write_atomic(os.path.join(folder, name), text.encode()) for name, text in texts.items()]
            if save_model:
                names.append(run.model.save(os.path.join(folder, "model.pt")))
            if figures:
                names += [save_figure(fig, os.path.join(folder, "figures", f"{name}.png")) for name, fig in run.figures.items()]
            names += run.units.write(folder, maps)
            run.timings["save_s"] = round(time.perf_counter() - started, 3)
            timings = json.dumps(_timings(run), indent=2)
            names.append(write_atomic(os.path.join(folder, "timings.json"), timings.encode()))
            if run._data_fingerprint() != run.data_fingerprint:  # the last moment before the swap
                raise DataError(f"the data changed while run {run.name} ran (files rewritten, added or removed, or a "
                                "split list edited): nothing was written; run it again on the data as they are now")
    finally:
        run.units.discard()
    return [os.path.join(run.directory, os.path.relpath(name, folder)) for name in names]


def _timings(run: Run) -> dict[str, Any]:
    total = round(sum(v for k, v in run.timings.items() if k.endswith("_s")), 3)
    return dict(run.timings, total_s=total, run_name=run.name, model=run.model_source, device=str(run.model.device),
                torch=torch.__version__, threads=torch.get_num_threads(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def run_evaluation(settings: Settings, model_path: Optional[str] = None, progress: bool = True,
                   figures: bool = True, save_model: bool = True, maps: bool = True) -> Optional[Run]:
    """Fit (or load ``model_path``), score every test group, compute the metrics
    table and write ``results/<run-name>/``: what ``python -m utils evaluate`` and the notebook do.
    ``maps`` (NIfTI volumes only): write each test volume's anomaly map.

    Under torchrun the data are read and the fit is sharded on every rank; rank 0 scores, computes
    the metrics and writes the folder, and returns the run; the other ranks return None.
    """
    with DistributedContext.from_settings(settings) as ctx:
        run = Run(settings, ctx)
        run.load_data()
        run.model_path = model_path
        # before the work, not only before the swap; rank 0 writes the folder
        ctx.agree("checking the results folder",
                  lambda: check_replaceable(run.directory, "evaluate", inputs=run.inputs()) if ctx.is_main else None)
        run.fit(progress=progress, model_path=model_path)
        if not ctx.is_main:
            return None
        run.score(progress=progress)
        run.compute_metrics()
        run.save(save_model=save_model, figures=figures, maps=maps)
        return run


def run_fit(settings: Settings, output_path: str | os.PathLike | None, progress: bool = True) -> Optional[str]:
    """Fit on the training set and write the model to ``output_path`` (``None``: ``model.pt`` in the
    run's folder, named after the settings and the training files); what ``fit`` on the command line
    does. Under torchrun the fit is sharded and rank 0 writes the model; returns the written path on
    rank 0 (or alone), ``None`` on the other ranks."""
    with DistributedContext.from_settings(settings) as ctx:
        run = Run(settings, ctx)
        run.load_data(("train",))
        model = run.fit(progress=progress)
        if model is None:
            return None
        return model.save(output_path if output_path is not None else os.path.join(run.directory, "model.pt"))
