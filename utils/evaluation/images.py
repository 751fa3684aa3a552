"""The evaluation's piece for 2-D images: each test group's distinct images scored once, the
per-group metrics under the protocols (A), (B), (C), AUPRO and Dice, and the example figures.

Protocols, per pathology (or defect) group:

- **(A)** the study's: pixel AUROC and average precision over every pixel of the group's rows,
  one row per annotation as the study lists them (a slice with two boxes counts twice, each time
  against one box), whole image.
- **(B)** the same, only pixels inside the row's head mask (box ∪ head-minus-boxes).
- **(C)** image AUROC: the group's distinct images against the normal test images; image score
  ``settings.image_score`` of the map inside the head.
- **AUPRO**: per-region overlap up to a false-positive rate of 0.3 (normalised to [0, 1], as in the
  MVTec AD papers) over the group's distinct images and the normal test images.
- **Dice**: pooled over the group's distinct images (union of their boxes) inside the head:
  ``dice_best`` at the best threshold chosen on the group itself (optimistic), and
  ``dice_val_threshold`` at the threshold from the normal validation maps.

The row ``mean`` is the unweighted mean over the groups; the row ``all`` pools the whole test set
(every distinct test image, normal ones included) as MVTec AD papers report: image AUROC of all
anomalous images against the normal ones, pixel AUROC / AP and AUPRO over all test pixels.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..config import Settings
from ..data import NORMAL, DataBundle, ImageSet, Item, Loader, counted
from ..padim import Padim
from .metrics import NAN, aupro, degenerate_reason, image_auroc, localisation
from .protocol import PATHOLOGIES, group_means, row_detections
from .plotting import example_figure
from .reference import NormalReference
from .report import SMALL_GROUP, TABLE_COLUMNS, with_mean_row

#: Examples per group in the figures.
EXAMPLES_PER_GROUP = 3


@dataclass
class GroupScores:
    """One test group, scored: arrays per distinct image and per CSV row (annotation).

    ``maps``/``masks``/``heads``/``scores``/``display`` have one entry per distinct image (first
    appearance order; masks and heads are the union over the image's rows); ``row_image`` maps each
    row to its image,
    ``row_masks``/``row_heads`` are the rows' own box and head masks.
    """

    name: str
    anomalous: bool
    paths: list[str]
    maps: np.ndarray  # (n, S, S) float32
    masks: np.ndarray  # (n, S, S) bool
    heads: np.ndarray  # (n, S, S) bool
    scores: np.ndarray  # (n,) image score inside the head
    display: np.ndarray  # (n, S, S) or (n, S, S, 3) float16 in [0, 1]: what the network saw
    row_image: np.ndarray  # (rows,) int
    row_masks: np.ndarray  # (rows, S, S) bool
    row_heads: np.ndarray  # (rows, S, S) bool

    @property
    def n_images(self) -> int:
        return len(self.paths)


def _union(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per distinct ``index``, the union (logical or) of the ``values`` with that index."""
    union = np.zeros((int(index.max()) + 1,) + values.shape[1:], dtype=bool)
    np.logical_or.at(union, index, values)
    return union


def score_group(model: Padim, dataset: ImageSet, settings: Settings, bar=None) -> GroupScores:
    """Score every distinct image of ``dataset`` once, with every row's masks decoded once.

    An image listed in several rows (one row per box) is read and scored once; its mask and head
    are the unions of its rows', and its
    image score is taken inside its head (the whole image where the head mask is empty).
    """
    row_image, paths = pd.Series(dataset.paths).factorize()  # the distinct paths, in first-appearance order
    pairs = [dataset.masks(row) for row in range(len(dataset.items))]  # (box, head) of every row
    row_masks, row_heads = (torch.stack(part).numpy() for part in zip(*pairs))
    masks, heads = _union(row_image, row_masks), _union(row_image, row_heads)
    if dataset.anomalous and not masks.any() and any(item.anomaly for item in dataset.items):
        warnings.warn(f"test group {dataset.name}: every one of its masks is empty; it is scored as an image-level "
                      "group ((C) only)", stacklevel=2)
    heads[~heads.reshape(len(paths), -1).any(axis=1)] = True
    images = ImageSet(dataset.name, [Item(path) for path in paths], settings)  # no mask files: nothing decoded twice
    maps, scores, display = [], [], []
    for batch in Loader(images, settings):
        result = model.score([batch], progress=False, region=torch.from_numpy(heads[batch["index"].numpy()]))
        maps.append(result.maps)
        scores.append(result.scores)
        display.append(batch["display"].numpy().astype(np.float16))
        if bar is not None:
            bar.update(len(batch["image"]))
    return GroupScores(
        name=dataset.name, anomalous=dataset.anomalous, paths=paths.tolist(), maps=np.concatenate(maps),
        masks=masks, heads=heads, scores=np.concatenate(scores).astype(np.float64), display=np.concatenate(display),
        row_image=row_image, row_masks=row_masks, row_heads=row_heads,
    )


def group_metrics(group: GroupScores, normal: Optional[GroupScores], threshold: float,
                  field_threshold: float = NAN) -> dict[str, Any]:
    """One table row for a pathology group (see the module docstring for the protocols). A group
    without masks (image level, e.g. the study's ``global`` slices) has image AUROC only. The field's
    F1 and detection rate (:mod:`utils.evaluation.protocol`) need ``field_threshold`` and a box in
    every row; columns left out are NaN in :func:`metrics_table`."""
    notes = [] if group.masks.any() else ["image-level group (no masks): (C) only"]
    reason = degenerate_reason(group.row_masks)
    if reason and group.masks.any():
        notes.append(f"A: {reason}")
    reason_b = degenerate_reason(group.row_masks[group.row_heads])
    if reason_b and not reason:
        notes.append(f"B: {reason_b} inside the head")
    pooled = [group] if normal is None else [group, normal]  # AUPRO: the group's images and the normal ones
    row = {"group": group.name, "n_images": group.n_images, "n_rows": len(group.row_image),
           "small_group": group.n_images <= SMALL_GROUP,
           "C_auroc": image_auroc(group.scores, normal.scores) if normal is not None else NAN,
           "aupro": aupro(np.concatenate([g.maps for g in pooled]), np.concatenate([g.masks for g in pooled]))}
    row |= localisation(threshold, group.maps, group.masks, group.heads,
                        rows=(group.maps[group.row_image], group.row_masks, group.row_heads))
    if math.isfinite(field_threshold) and group.row_masks.any(axis=(1, 2)).all():  # the field's protocol: a box per row
        detections = row_detections(group.maps, group.row_image, group.row_masks, group.row_heads, field_threshold)
        row["field_f1"], row["field_detection"] = group_means(detections)
    if normal is None or normal.n_images <= SMALL_GROUP:  # (C) compares with the normal images: as noisy as few
        notes.append(f"C: only {counted(normal.n_images, 'normal image')}" if normal else "C: no normal test images")
    if row["small_group"]:
        notes.append(f"only {counted(group.n_images)}: noise")
    row["note"] = "; ".join(notes)
    return row


def whole_test_metrics(groups: dict[str, GroupScores], threshold: float) -> dict[str, Any]:
    """The row ``all``: every distinct test image once (normal ones included; an image in two
    groups with the union of its masks), pooled; the pixel metrics leave out anomalous images without
    a mask (image-level groups): their lesion pixels would count as normal ones."""
    parts = list(groups.values())
    image, paths = pd.Series([path for group in parts for path in group.paths]).factorize()
    first = np.unique(image, return_index=True)[1]
    maps, heads, scores = (np.concatenate([getattr(g, name) for g in parts])[first] for name in ("maps", "heads", "scores"))
    masks = _union(image, np.concatenate([group.masks for group in parts]))
    anomalous = _union(image, np.repeat([group.anomalous for group in parts], [group.n_images for group in parts]))
    located = ~anomalous | masks.any(axis=(1, 2))
    unlocated = "" if located.all() else f"; pixel metrics without the {counted(int((~located).sum()))} without masks"
    return {
        "group": "all", "n_images": len(paths), "n_rows": sum(len(g.row_image) for g in parts), "small_group": False,
        "C_auroc": image_auroc(scores[anomalous], scores[~anomalous]), "aupro": aupro(maps[located], masks[located]),
        "field_f1": NAN, "field_detection": NAN,
        "note": f"whole test set, every distinct image once (normal images included{unlocated})",
    } | localisation(threshold, maps[located], masks[located], heads[located])


def metrics_table(groups: dict[str, GroupScores], threshold: float, field_threshold: float = NAN) -> pd.DataFrame:
    """One row per pathology group (all groups but ``normal``), then ``mean`` (the unweighted mean
    over those groups, ignoring NaN; n_images/n_rows: totals) and ``all`` (:func:`whole_test_metrics`)."""
    normal = groups.get(NORMAL)
    rows = [group_metrics(g, normal, threshold, field_threshold) for name, g in groups.items() if name != NORMAL]
    return with_mean_row(pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), whole_test_metrics(groups, threshold))


class ImageUnits:
    """What an evaluation run does that is particular to 2-D images (:class:`utils.evaluation.run.Run`)."""

    unit = "image"

    def __init__(self, settings: Settings):
        self.settings = settings
        #: Group name -> its scores, after :meth:`score`.
        self.groups: dict[str, GroupScores] = {}

    def count(self, bundle: DataBundle) -> int:
        """How many images :meth:`score` scores: each distinct test image once."""
        return sum(len(set(group.paths)) for group in bundle.test.values())

    def score(self, model: Padim, bundle: DataBundle, reference: NormalReference, bar) -> None:
        """Score every test group (``bar``: the run's progress bar)."""
        self.groups = {}
        for name, dataset in bundle.test.items():
            bar.set_description(f"score {name}")
            self.groups[name] = score_group(model, dataset, self.settings, bar)

    def table(self, reference: NormalReference) -> tuple[pd.DataFrame, None, list[str]]:
        """The metrics table (one row per group, ``mean``, ``all``; images have no per-unit table) and
        notes for the report: the field's summary numbers over its 13 pathologies, where the table
        has them (docs/protocol.md)."""
        table = metrics_table(self.groups, reference.threshold, reference.field_threshold)
        notes = [] if NORMAL in self.groups else ["no normal test images: (C) image AUROC is undefined"]
        notes.append(f"field protocol: threshold {reference.field_threshold:.4g} (5 % of the validation pixels inside the "
                     "head above it); F1 and detection rate per group in the columns field_f1 and field_detection")
        groups = table.set_index("group")
        present = [name for name in PATHOLOGIES if name in groups.index and np.isfinite(groups.loc[name, "field_f1"])]
        if present:
            chosen = groups.loc[present]
            rate = float((chosen["field_detection"] * chosen["n_rows"]).sum() / chosen["n_rows"].sum())
            notes.append(f"field protocol over {len(present)} of the {len(PATHOLOGIES)} compai-lab pathologies: "
                         f"mean F1 {chosen['field_f1'].mean():.3f}, detection rate over their rows {rate:.3f}")
        return table, None, notes

    def figures(self, reference: NormalReference) -> dict[str, Figure]:
        """``examples_<group>``: a few images of each pathology group with their maps."""
        figures = {}
        for name, group in self.groups.items():
            if name == NORMAL:
                continue
            masked = [i for i in range(group.n_images) if group.masks[i].any()]
            chosen = (masked or list(range(group.n_images)))[:EXAMPLES_PER_GROUP]
            figures[f"examples_{name}"] = example_figure(
                group.display[chosen].astype(np.float32), group.masks[chosen], group.maps[chosen],
                threshold=reference.threshold, vmin=reference.vmin, vmax=reference.vmax, heads=group.heads[chosen],
                labels=[os.path.basename(group.paths[i])[:28] for i in chosen],
                title=f"{name}: threshold and colour scale from {reference.source}",
            )
        return figures

    def write(self, folder: str, maps: bool) -> list[str]:
        """Files of their own in the results folder: none for images."""
        return []

    def discard(self) -> None:
        """Nothing is staged for images."""

    def column_notes(self) -> list[str]:
        """What the columns of ``metrics.md`` mean."""
        return [
            "(A) pixel AUROC / average precision (scikit-learn) over all pixels of the group's rows (one per "
            "annotation), whole image. (B) the same, only pixels inside the head mask.",
            f"(C) image AUROC: the group's distinct images against the normal test images; image score: "
            f"`{self.settings.image_score}` of the map inside the head.",
            "AUPRO@0.3: per-region overlap integrated up to a false-positive rate of 0.3, normalised to [0, 1], "
            "over the group's images and the normal test images.",
            "Dice over the group's distinct images (union of boxes), inside the head. *Dice best is optimistic*: "
            "its threshold is chosen on the test group itself. Dice @ val thr. uses the validation threshold.",
            "**mean**: unweighted mean over the groups. **all**: the whole test set pooled, every distinct image "
            "once, normal images included (the numbers MVTec AD papers report).",
            "F1 (field), detected (field): the compai-lab protocol per annotation row at the threshold that leaves 5 % "
            "of the validation pixels above it (docs/protocol.md): mean F1 and detection rate (mean TP) of the group.",
        ]
