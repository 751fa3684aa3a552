"""Evaluation of NIfTI volumes: the steps of :class:`utils.evaluation.Evaluation`, per volume.

::

    ev = VolumeEvaluation(settings)    # results/<run-name>/
    ev.load_data()                     # utils.volumes.load_volume_data (slices of train / val volumes)
    ev.fit()                           # PaDiM on the training slices
    ev.score()                         # val slices -> threshold and colour scale; each test volume once
    ev.compute_metrics()               # ev.volumes (one row per test volume), ev.table (per group + mean)
    ev.make_figures()                  # three orthogonal views through the lesion of a few volumes
    ev.save(maps=True)                 # volumes.csv, metrics.csv, config.yaml, timings.json, model.pt,
                                       # figures/, maps/<case>_anomaly.nii.gz

Columns (see :func:`utils.volumes.volume_metrics`): ``A`` = voxels of the whole volume, ``B`` =
voxels inside the brain, ``C`` = slice level (slices with lesion voxels against slices without);
``dice_val_threshold`` at the validation threshold, ``dice_best`` (in volumes.csv
``dice_best_optimistic``) at the best threshold chosen on the volume itself. ``metrics.csv``:
the mean over each group's volumes, then ``mean`` (unweighted over groups); ``aupro`` is not
computed for volumes (NaN). Scoring holds one volume at a time; its map is written to a
temporary folder in the run folder and moved to ``maps/`` by :meth:`save` (or removed with ``maps=False``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from ..data import DataBundle, load_data, make_loader
from ..data.volumes import read_volume, score_volume, write_map
from ..errors import DataError
from ..files import staged_folder, write_atomic
from . import metrics as M
from . import report
from .plotting import planes_figure, save_figure, volume_planes
from .run import METRIC_COLUMNS, SMALL_GROUP, TABLE_COLUMNS, NormalReference, Run, with_mean_row

#: Test volumes shown in the figures.
FIGURE_VOLUMES = 3




def slice_scores(anomaly: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(Z,) the map's maximum inside the brain on each axial slice (0 where a slice has no brain)."""
    scores = np.where(brain, anomaly, -np.inf).max(axis=(0, 1))
    return np.where(np.isfinite(scores), scores, 0.0)


def volume_metrics(anomaly: np.ndarray, label: np.ndarray, brain: np.ndarray, kept: np.ndarray, threshold: float) -> dict:
    """One test volume's row (all arrays (X, Y, Z) on one grid; ``kept`` (Z,)):

    - ``A_auroc`` / ``A_ap``: voxel AUROC / AP over the whole volume;
    - ``B_auroc`` / ``B_ap``: the same inside the brain;
    - ``C_auroc``: slice level over the kept slices, slices with lesion voxels against slices
      without, slice score = max of the map inside the brain;
    - ``dice_val_threshold``: Dice of ``map >= threshold`` (from the validation maps) inside the brain;
    - ``dice_best_optimistic``: the best Dice over all thresholds, chosen on this volume itself.
    """
    a_auroc, a_ap = M.pixel_metrics(anomaly, label)
    b_auroc, b_ap = M.pixel_metrics(anomaly, label, brain)
    slices = np.flatnonzero(kept)
    c_auroc = M.auroc_ap(slice_scores(anomaly, brain)[slices], label[:, :, slices].any(axis=(0, 1)))[0]
    dice_best, best_threshold = M.best_dice(anomaly, label, brain)
    return {
        "lesion_voxels": int(label.sum()), "brain_voxels": int(brain.sum()), "slices_scored": int(kept.sum()),
        "A_auroc": a_auroc, "A_ap": a_ap, "B_auroc": b_auroc, "B_ap": b_ap, "C_auroc": c_auroc,
        "dice_val_threshold": M.dice_at(anomaly, label, threshold, brain),
        "dice_best_optimistic": dice_best, "best_threshold": best_threshold,
    }



@dataclass
class VolumeEvaluation(Run):
    """One evaluation run on NIfTI volumes (see the module docstring)."""

    rows: list[dict] = field(default_factory=list)
    volumes: Optional[pd.DataFrame] = None
    #: (case, planes of image / map / label through the lesion, gray scale, centre) of the first
    #: few test volumes with a lesion, for :meth:`make_figures`: planes, not volumes, are kept.
    shown: list[tuple] = field(default_factory=list)
    _staging: Optional[str] = None

    def load_data(self) -> DataBundle:
        started = time.perf_counter()
        self._use_data(load_data(self.settings))
        if self.bundle.val is None:
            raise DataError("no validation volumes for the threshold and colour scale: add val rows to the manifest, "
                            "or set data.val_fraction > 0 to hold out train volumes")
        self.timings["load_data_s"] = round(time.perf_counter() - started, 3)
        self.notes.append(f"data: {self.bundle.summary()}; threshold from {self.bundle.val_description}")
        return self.bundle

    def _reference(self) -> NormalReference:
        maps, regions = [], []
        for batch in make_loader(self.bundle.val, self.settings):
            maps.append(self.model.score(batch["image"], progress=False).maps)
            regions.append(batch["head"].numpy())
        return NormalReference.from_maps(np.concatenate(maps), np.concatenate(regions), self.bundle.val_description,
                                         region_kind="brain")

    def score(self, progress: bool = True) -> list[dict]:
        """Threshold and colour scale from the validation slices, then each test volume once; on
        any failure the maps written so far are removed."""
        if self.model is None:
            raise RuntimeError("call fit() before score()")
        started = time.perf_counter()
        self.reference = self._reference()
        os.makedirs(self.settings.results_dir, exist_ok=True)
        self._staging = tempfile.mkdtemp(prefix=f".{self.name}.maps-", dir=self.settings.results_dir)
        entries = [(name, e) for name, group in self.bundle.test.items() for e in group.entries]
        self.rows, self.shown = [], []
        try:
            for name, entry in tqdm(entries, desc="score volumes", unit="volume", disable=not progress):
                self.rows.append({"case": entry.case, "group": name} | self._score_volume(entry))
        except BaseException:
            self.discard_maps()
            raise
        seconds = time.perf_counter() - started
        self.timings.update(score_s=round(seconds, 3), test_volumes=len(entries),
                            seconds_per_volume=round(seconds / max(len(entries), 1), 3))
        return self.rows

    def _score_volume(self, entry) -> dict:
        """Score one test volume, stage its map, keep three planes of the first few with a lesion."""
        volume = read_volume(entry, self.settings)
        anomaly = score_volume(self.model, volume, self.settings)
        write_map(anomaly, volume, os.path.join(self._staging, f"{entry.case}_anomaly.nii.gz"))
        if len(self.shown) < FIGURE_VOLUMES and volume.label.any():
            centre = tuple(int(round(c)) for c in ndimage.center_of_mass(volume.label))
            self.shown.append((entry.case, *volume_planes(volume.image, anomaly, volume.label, centre), centre))
        return volume_metrics(anomaly, volume.label, volume.brain, volume.kept, self.reference.threshold)

    def discard_maps(self) -> None:
        """Remove the staged maps (after a failure, or when they are not wanted)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def compute_metrics(self) -> pd.DataFrame:
        """``self.volumes`` (one row per test volume) and ``self.table`` (per group, then ``mean``)."""
        if not self.rows:
            raise RuntimeError("call score() before compute_metrics()")
        self.volumes = pd.DataFrame(self.rows)
        groups = []
        for name, part in self.volumes.groupby("group", sort=False):
            row = {"group": name, "n_images": len(part), "n_rows": int(part["slices_scored"].sum()),
                   "small_group": len(part) <= SMALL_GROUP, "aupro": M.NAN, "dice_best": float(part["dice_best_optimistic"].mean()),
                   "best_threshold": M.NAN, "note": f"mean over {len(part)} volumes"}
            row |= {c: float(part[c].mean()) for c in METRIC_COLUMNS if c in part}
            groups.append(row)
        self.table = with_mean_row(pd.DataFrame(groups, columns=list(TABLE_COLUMNS)))
        return self.table

    def make_figures(self) -> dict[str, Any]:
        """Three orthogonal views through the lesion (its centre of mass) of the first few test
        volumes with a lesion, with the validation colour scale and threshold."""
        ref = self.reference
        self.figures = {
            f"volume_{case}": planes_figure(planes, centre, gray, (ref.vmin, ref.vmax), threshold=ref.threshold,
                                            title=f"{case}: colour scale and threshold from {ref.source}")
            for case, planes, gray, centre in self.shown
        }
        return self.figures

    def save(self, save_model: bool = True, figures: bool = True, maps: bool = True) -> str:
        """Write the results folder as a whole (:func:`utils.files.staged_folder`, as for images);
        ``maps``: the staged NIfTI maps become its ``maps/``, else they are removed."""
        if self.table is None:
            raise RuntimeError("call compute_metrics() before save()")
        csv = {"float_format": "%.6f", "na_rep": "nan", "index": False}
        try:
            with staged_folder(self.directory) as folder:
                write_atomic(os.path.join(folder, "volumes.csv"), self.volumes.to_csv(**csv).encode())
                write_atomic(os.path.join(folder, "metrics.csv"), self.table.to_csv(**csv).encode())
                write_atomic(os.path.join(folder, "metrics.md"), report.volume_markdown(self).encode())
                write_atomic(os.path.join(folder, "config.yaml"), self._config_yaml().encode())
                if save_model and self.model is not None:
                    self.model.save(os.path.join(folder, "model.pt"))
                if figures:
                    for name, figure in (self.figures or self.make_figures()).items():
                        save_figure(figure, os.path.join(folder, "figures", f"{name}.png"))
                if self._staging is not None and maps:
                    os.replace(self._staging, os.path.join(folder, "maps"))
                    self._staging = None
                write_atomic(os.path.join(folder, "timings.json"), json.dumps(self._timings(), indent=2).encode())
        finally:
            self.discard_maps()
        return self.directory

    def summary(self) -> str:
        """The per-volume table, the per-group table, notes and timings as plain text."""
        return report.volume_summary(self)
