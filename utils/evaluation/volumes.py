"""The evaluation's piece for NIfTI volumes: each test volume scored once (one volume in memory at
a time, its map staged as NIfTI in the scan's own space), per-volume metrics and their group means,
and views through the lesions.

Columns (:func:`volume_metrics`, over the scored slices): ``A`` = every voxel, ``B`` = voxels inside the
brain, ``C`` = slice level (slices with lesion voxels against slices without);
``dice_val_threshold`` at the validation threshold, ``dice_best`` (in volumes.csv
``dice_best_optimistic``) at the best threshold chosen on the volume itself. ``metrics.csv``:
the mean over each group's volumes, then ``mean`` (unweighted over groups); ``aupro`` is not
computed for volumes (NaN). ``volumes.csv`` holds one row per test volume, ``maps/`` the anomaly
maps (``<case>_anomaly.nii.gz``, the scan's shape and affine).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage

from ..config import Settings
from ..data import DataBundle
from ..data.volumes import VolumeEntry, read_volume, score_volume, write_map
from ..files import staging_folder
from ..padim import Padim
from .metrics import NAN, auroc_ap, localisation
from .plotting import planes_figure, volume_planes
from .reference import NormalReference
from .report import METRIC_COLUMNS, SMALL_GROUP, TABLE_COLUMNS, with_mean_row

#: Test volumes shown in the figures.
FIGURE_VOLUMES = 3
#: A test volume's metrics, in the order of volumes.csv (where ``dice_best`` is ``dice_best_optimistic``).
VOLUME_METRICS = ("A_auroc", "A_ap", "B_auroc", "B_ap", "C_auroc", "dice_val_threshold", "dice_best", "best_threshold")


def slice_scores(anomaly: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(Z,) the map's maximum inside the brain on each axial slice (0 where a slice has no brain)."""
    scores = np.where(brain, anomaly, -np.inf).max(axis=(0, 1))
    return np.where(np.isfinite(scores), scores, 0.0)


def volume_metrics(anomaly: np.ndarray, label: np.ndarray, brain: np.ndarray, kept: np.ndarray, threshold: float) -> dict:
    """One test volume's row (all arrays (X, Y, Z) on one grid; ``kept`` (Z,)), over its scored slices
    (``kept``) only: slices not scored have no map, so a lesion there could only count as missed:

    - ``A_auroc`` / ``A_ap``: voxel AUROC / AP over the scored slices;
    - ``B_auroc`` / ``B_ap``: the same inside the brain;
    - ``C_auroc``: slice level, slices with lesion voxels against slices without, slice score = max of
      the map inside the brain;
    - ``dice_val_threshold``: Dice of ``map >= threshold`` (from the validation maps) inside the brain;
    - ``dice_best`` (with its ``best_threshold``): the best Dice over all thresholds, chosen on this volume itself.

    A volume without a lesion voxel in a scored slice has no metric: NaN, and a ``note`` that says why;
    so has each metric whose ranking lacks a class (every scored voxel lesion, no lesion inside the brain, ...).
    """
    counts = {"lesion_voxels": int(label.sum()), "brain_voxels": int(brain.sum()), "slices_scored": int(kept.sum())}
    anomaly, label, brain = anomaly[:, :, kept], label[:, :, kept], brain[:, :, kept]
    if not label.any():
        note = ("no slice scored: none has data.min_brain_fraction of brain" if not kept.any() else
                "no lesion voxel in its scored slices" + (" (its label is empty)" if not counts["lesion_voxels"] else
                                                          " (its lesion lies in slices under data.min_brain_fraction)"))
        return counts | dict.fromkeys(VOLUME_METRICS, NAN) | {"note": note}
    found = localisation(threshold, anomaly, label, brain)
    found["C_auroc"] = auroc_ap(slice_scores(anomaly, brain), label.any(axis=(0, 1)))[0]
    row = {name: found[name] for name in VOLUME_METRICS}
    return counts | row | {"note": "; ".join(_one_class(row, label, brain))}


#: What the volume metrics rank, as (their columns, the lesion class of what they rank, its name, the whole's).
RANKED = ((("A_auroc", "A_ap"), lambda label, brain: label, "voxel", "scored voxel"),
          (("B_auroc", "B_ap", "dice_val_threshold", "dice_best", "best_threshold"),
           lambda label, brain: label[brain], "voxel inside the brain", "brain voxel"),
          (("C_auroc",), lambda label, brain: label.any(axis=(0, 1)), "slice", "scored slice"))


def _one_class(row: dict, label: np.ndarray, brain: np.ndarray) -> list[str]:
    """Why metrics of a volume with lesion voxels are NaN in ``row``: what they rank holds one class only."""
    reasons = []
    for columns, lesion_of, unit, whole in RANKED:
        if missing := [column for column in columns if np.isnan(row[column])]:
            # a ranking, or a Dice inside the brain, is undefined only when it holds one class
            why = f"no lesion {unit}" if not lesion_of(label, brain).any() else f"every {whole} is lesion"
            reasons.append(f"{', '.join(missing)} NaN: {why}")
    return reasons


class VolumeUnits:
    """What an evaluation run does that is particular to NIfTI volumes (:class:`utils.evaluation.run.Run`)."""

    unit = "volume"

    def __init__(self, settings: Settings, name: str):
        self.settings, self.name = settings, name  # the run's name: its maps are staged in results_dir
        #: One row per test volume (:func:`volume_metrics`), after :meth:`score`.
        self.rows: list[dict] = []
        #: (case, planes through the lesion, gray scale, centre) of the first few volumes with a lesion.
        self.shown: list[tuple] = []
        self._staging: Optional[str] = None

    def count(self, bundle: DataBundle) -> int:
        return sum(len(group) for group in bundle.test.values())

    def score(self, model: Padim, bundle: DataBundle, reference: NormalReference, bar) -> None:
        """Score each test volume once (``bar``: the run's progress bar), staging its map; on any failure
        the staged maps are removed."""
        os.makedirs(self.settings.results_dir, exist_ok=True)
        self._staging = staging_folder(self.settings.results_dir, self.name, "maps")  # swept if this process dies
        self.rows, self.shown = [], []
        try:
            for name, group in bundle.test.items():
                for entry in group.entries:
                    self.rows.append({"case": entry.case, "group": name} | self._score_volume(model, entry, reference))
                    bar.update(1)
        except BaseException:
            self.discard()
            raise

    def _score_volume(self, model: Padim, entry: VolumeEntry, reference: NormalReference) -> dict:
        volume = read_volume(entry, self.settings)
        anomaly = score_volume(model, volume, self.settings)
        write_map(anomaly, volume, os.path.join(self._staging, f"{entry.case}_anomaly.nii.gz"))
        if len(self.shown) < FIGURE_VOLUMES and volume.label.any():
            centre = tuple(int(round(c)) for c in ndimage.center_of_mass(volume.label))
            self.shown.append((entry.case, *volume_planes(volume.image, anomaly, volume.label, centre), centre))
        return volume_metrics(anomaly, volume.label, volume.brain, volume.kept, reference.threshold)

    def table(self, reference: NormalReference) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
        """The metrics table (each group's mean over its volumes, then ``mean``), the per-volume table
        and no notes: AUPRO and the field's protocol (2-D slices with boxes) are not computed for volumes."""
        volumes = pd.DataFrame(self.rows)
        groups = []
        for name, part in volumes.groupby("group", sort=False):
            reasons = part.loc[part["note"] != "", "note"]
            note = (f"{len(reasons)} of {len(part)} volumes without some metrics (NaN: left out of their means): "
                    f"{'; '.join(reasons.unique())}"
                    if len(reasons) else f"mean over {len(part)} volumes")
            groups.append({column: float(part[column].mean()) for column in METRIC_COLUMNS if column in part} | {
                "group": name, "n_images": len(part), "n_rows": int(part["slices_scored"].sum()),
                "small_group": len(part) <= SMALL_GROUP, "note": note})
        table = with_mean_row(pd.DataFrame(groups, columns=list(TABLE_COLUMNS)))
        return table, volumes.rename(columns={"dice_best": "dice_best_optimistic"}), []

    def figures(self, reference: NormalReference) -> dict[str, Figure]:
        """``volume_<case>``: three orthogonal views through the lesion (its centre of mass) of the first
        few test volumes with a lesion, with the validation colour scale and threshold."""
        return {
            f"volume_{case}": planes_figure(planes, centre, gray, (reference.vmin, reference.vmax), threshold=reference.threshold,
                                            title=f"{case}: colour scale and threshold from {reference.source}")
            for case, planes, gray, centre in self.shown
        }

    def write(self, folder: str, maps: bool) -> list[str]:
        """``maps/``: the staged NIfTI maps (with ``maps``; else they are removed)."""
        if self._staging is None or not maps:
            self.discard()
            return []
        target = os.path.join(folder, "maps")
        os.replace(self._staging, target)
        self._staging = None
        return [os.path.join(target, name) for name in sorted(os.listdir(target))]

    def discard(self) -> None:
        """Remove the staged maps (after a failure, or when they are not wanted)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def column_notes(self) -> list[str]:
        return [
            "A: voxel AUROC / AP over the scored slices; B: inside the brain; C: slice level (slices with lesion "
            "voxels against slices without, slice score = the map's maximum inside the brain).",
            "Dice @ val thr.: at the validation threshold, inside the brain. *Dice best is optimistic*: its threshold "
            "is chosen on the volume itself. Group rows are means over the group's volumes; **mean** over the groups.",
        ]
