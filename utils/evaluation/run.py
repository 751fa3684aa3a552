"""Per-group evaluation under three protocols, and the results folder.

:class:`Evaluation` runs the steps the notebook shows one by one (and :func:`run_evaluation`
runs them all, for ``python -m utils evaluate``), so both write the same files::

    ev = Evaluation(settings)          # run name and folder: results/<run-name>/
    ev.load_data()                     # utils.data.load_data
    ev.fit(progress=True)              # Padim.fit on the training images (or Padim.load)
    ev.score(progress=True)            # validation maps (threshold, colour scale), every test group once
    ev.compute_metrics()               # ev.table: one row per group, then "mean" and "all"
    ev.make_figures()                  # example rows per group, AUROC bars (matplotlib figures)
    ev.save()                          # metrics.csv, metrics.md, config.yaml, timings.json, model.pt, figures/

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
  ``dice_val_threshold`` at the threshold from the normal validation maps (the 99th percentile of
  their pixels inside the head).

The row ``mean`` is the unweighted mean over the groups; the row ``all`` pools the whole test set
(every distinct test image, normal ones included) as MVTec AD papers report: image AUROC of all
anomalous images against the normal ones, pixel AUROC / AP and AUPRO over all test pixels.

Maps are never normalised with test statistics, and the threshold and colour scale never come
from the images they are applied to: without a validation split, a seeded held-out fraction of
the training images serves (``data.val_fraction``, :func:`utils.data.load_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from ..config import Settings
from ..data import NORMAL, DataBundle, ImageSet, Item, counted, fingerprint, load_data, make_loader
from ..data.preprocess import read_mask, resize_mask
from ..distributed import DistributedContext, distributed_fit, prepare_demo
from ..errors import DataError, ModelFileError
from ..files import staged_folder, write_atomic
from ..padim import Padim
from ..padim.foreground import foreground_mask
from ..padim.model_file import check_compatible
from . import metrics as M
from . import report
from .plotting import auroc_bar_plot, example_figure, save_figure

#: Bump when the meaning of a run's files changes: old names can then never be mistaken for new ones.
RUN_NAME_VERSION = 2
#: Settings that change neither the model nor any number in the results (excluded from the run name).
RUN_TIME_KEYS = ("device", "batch_size", "results_dir", "target_dimension")
RUN_TIME_DATA_KEYS = ("num_workers",)
#: Groups with at most this many distinct images are flagged: their numbers are noise.
SMALL_GROUP = 2
#: Percentile of normal validation pixels (inside the head) used as the decision threshold.
VAL_PERCENTILE = 99.0
#: Examples per group in the figures.
EXAMPLES_PER_GROUP = 3
METRIC_COLUMNS = ("A_auroc", "A_ap", "B_auroc", "B_ap", "C_auroc", "aupro", "dice_best", "dice_val_threshold")
TABLE_COLUMNS = ("group", "n_images", "n_rows", "small_group") + METRIC_COLUMNS + ("best_threshold", "note")


# ---------------------------------------------------------------------------- run names
def run_identity(settings: Settings, data_fingerprint: str) -> dict[str, Any]:
    """Every setting that can change a result, canonicalised, and the fingerprint of the files the
    run reads (:func:`utils.data.fingerprint`): what :func:`run_name` hashes.

    Excluded: device, batch size, results folder, worker count and the ``target_dimension``
    check, which change no number. ``data.root`` is normalised (``./data/x/`` = ``data/x``);
    ``data.demo_seed`` counts only for the demo format. A weights file is identified by its
    path and content hash, so replacing the file changes the name; so do images added to, removed
    from or rewritten in the data under the same config.
    """
    identity = settings.to_dict()
    for key in RUN_TIME_KEYS:
        identity.pop(key, None)
    data = identity["data"]
    for key in RUN_TIME_DATA_KEYS:
        data.pop(key, None)
    data["root"] = os.path.normpath(data["root"])
    if data["format"] != "demo":
        data.pop("demo_seed", None)
    if settings.weights not in ("imagenet", "random") and os.path.isfile(settings.weights):
        identity["weights_sha256"] = _file_sha256(settings.weights)
    identity["data_fingerprint"] = data_fingerprint
    identity["run_name_version"] = RUN_NAME_VERSION
    return identity


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.") or "x"


def run_name(settings: Settings, data_fingerprint: str) -> str:
    """``<format>-<backbone>-<weights>-<size>px-d<channels>-seed<seed>-<hash>``.

    The readable prefix names the main choices; the 10-hex-digit hash covers the canonical JSON of
    :func:`run_identity`. Identical settings on identical files give the same name; anything that
    changes a result gives another name, so a results folder never describes two runs.
    """
    canonical = json.dumps(run_identity(settings, data_fingerprint), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]
    weights = settings.weights if settings.weights in ("imagenet", "random") else os.path.splitext(os.path.basename(settings.weights))[0]
    prefix = f"{settings.data.format}-{settings.backbone}-{_slug(weights)[:24]}-{settings.input_size}px-d{settings.kept_channels}-seed{settings.seed}"
    return f"{prefix}-{digest}"


def run_directory(settings: Settings, data_fingerprint: str) -> str:
    """``<results_dir>/<run-name>`` (not created here)."""
    return os.path.join(settings.results_dir, run_name(settings, data_fingerprint))


# ---------------------------------------------------------------------------- scored groups
@dataclass
class GroupScores:
    """One test group, scored: arrays per distinct image and per CSV row (annotation).

    ``maps``/``masks``/``heads``/``scores``/``display`` have one entry per distinct image (first
    appearance order; masks and heads are the union over the image's rows, as
    :meth:`utils.data.ImageSet.per_image` defines them); ``row_image`` maps each row to its image,
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

    @property
    def n_rows(self) -> int:
        return len(self.row_image)


@dataclass
class NormalReference:
    """Statistics of normal validation maps: the decision threshold and the heat-map colour scale.

    ``threshold``: ``percentile`` of the pixels inside the head. ``vmin``: their 1st percentile;
    ``vmax``: the threshold, so every pixel above the threshold saturates the colour scale (the
    same pixels the thresholded panel shows).
    """

    source: str
    n_images: int
    #: How the heads of the reference images were found: annotated, brain map, estimated, whole image.
    region_kind: str
    percentile: float
    threshold: float
    vmin: float
    vmax: float
    median: float

    @classmethod
    def from_maps(cls, maps: np.ndarray, regions: np.ndarray, source: str, percentile: float = VAL_PERCENTILE,
                  region_kind: str = "given") -> "NormalReference":
        values = np.asarray(maps, dtype=np.float32)[np.asarray(regions, dtype=bool)]
        threshold = M.normal_threshold(values, None, percentile)
        low, median = (float(v) for v in np.percentile(values, [1.0, 50.0]))
        high = max(threshold, low + 1e-6)
        return cls(source, int(len(maps)), region_kind, percentile, threshold, low, high, median)


def score_group(model: Padim, dataset: ImageSet, settings: Settings, bar=None) -> GroupScores:
    """Score every distinct image of ``dataset`` once, with every row's masks decoded once.

    An image listed in several rows (one row per box) is read and scored once; its mask and head
    are the unions of its rows' (as :meth:`utils.data.ImageSet.per_image` defines them), and its
    image score is taken inside its head (the whole image where the head mask is empty).
    """
    paths = list(dict.fromkeys(dataset.paths))  # distinct images, in first-appearance order
    if not paths:
        raise DataError(f"test group {dataset.name!r} holds no images")
    index_of = {path: index for index, path in enumerate(paths)}
    row_image = np.asarray([index_of[item.image] for item in dataset.items], dtype=np.int64)
    row_pairs = [dataset.masks(row) for row in range(len(dataset.items))]
    row_masks = np.stack([mask.numpy() for mask, _ in row_pairs])
    row_heads = np.stack([head.numpy() for _, head in row_pairs])
    masks = np.zeros((len(paths),) + row_masks.shape[1:], dtype=bool)
    heads = np.zeros_like(masks)
    np.logical_or.at(masks, row_image, row_masks)
    np.logical_or.at(heads, row_image, row_heads)
    heads[~heads.reshape(len(paths), -1).any(axis=1)] = True
    images = ImageSet(dataset.name, [Item(path) for path in paths], settings)  # no mask files: nothing decoded twice
    maps, scores, display = [], [], []
    for batch in make_loader(images, settings):
        result = model.score(batch["image"], progress=False, region=torch.from_numpy(heads[batch["index"].numpy()]))
        maps.append(result.maps)
        scores.append(result.scores)
        display.append(batch["display"].numpy().astype(np.float16))
        if bar is not None:
            bar.update(len(batch["image"]))
    return GroupScores(
        name=dataset.name, anomalous=dataset.anomalous, paths=paths, maps=np.concatenate(maps), masks=masks, heads=heads,
        scores=np.concatenate(scores).astype(np.float64), display=np.concatenate(display),
        row_image=row_image, row_masks=row_masks, row_heads=row_heads,
    )


#: Study layout: a fastMRI slice ``x.png`` has its brain mask beside it as ``x_brain_map_full.png``.
BRAIN_MAP_SUFFIX = "_brain_map_full.png"


def reference_region(path: str, display: torch.Tensor, head: torch.Tensor, settings: Settings) -> tuple[np.ndarray, str]:
    """The region of a normal validation image whose pixels set the threshold, and where it came from.

    MVTec images: the whole image. Brain images, in order: the dataset's own head mask when it
    has one (not all True); the study layout's brain mask beside the image
    (``<stem>_brain_map_full.png``); otherwise an estimate from the image itself
    (:func:`utils.preprocess.foreground_mask`, which also takes in the skull).
    """
    head = head.numpy().astype(bool)
    if settings.data.format == "mvtec":
        return np.ones_like(head), "whole image"
    if not head.all():
        return head, "annotated"
    brain_map = os.path.splitext(path)[0] + BRAIN_MAP_SUFFIX
    if os.path.isfile(brain_map):
        mask = read_mask(brain_map)
        if mask.any():
            return resize_mask(mask, settings).numpy(), "brain map"
    gray = display.float().mean(dim=-1) if display.ndim == 3 else display.float()
    return foreground_mask(gray).numpy(), "estimated"


def reference_maps(model: Padim, dataset: ImageSet, settings: Settings, bar=None) -> tuple[np.ndarray, np.ndarray, str]:
    """Maps of normal validation images, their regions (:func:`reference_region`) and how those were found."""
    maps, regions, kinds = [], [], set()
    for batch in make_loader(dataset, settings):
        maps.append(model.score(batch["image"], progress=False).maps)
        for path, display, head in zip(batch["path"], batch["display"], batch["head"]):
            region, kind = reference_region(path, display, head, settings)
            regions.append(region)
            kinds.add(kind)
        if bar is not None:
            bar.update(len(batch["image"]))
    return np.concatenate(maps), np.stack(regions), "+".join(sorted(kinds))


# ---------------------------------------------------------------------------- metrics
def _aupro_with_normals(group: GroupScores, normal: Optional[GroupScores]) -> float:
    if normal is None:
        return M.aupro(group.maps, group.masks)
    return M.aupro(np.concatenate([group.maps, normal.maps]), np.concatenate([group.masks, normal.masks]))


def group_metrics(group: GroupScores, normal: Optional[GroupScores], threshold: float) -> dict[str, Any]:
    """One table row for a pathology group (see the module docstring for the protocols)."""
    notes = []
    row_maps = group.maps[group.row_image]
    reason = M.degenerate_reason(group.row_masks)
    if reason:
        notes.append(f"A: {reason}")
    reason_b = M.degenerate_reason(group.row_masks[group.row_heads])
    if reason_b and not reason:
        notes.append(f"B: {reason_b} inside the head")
    if normal is None:
        notes.append("C: no normal test images")
    dice_best, best_threshold = M.best_dice(group.maps, group.masks, group.heads)
    a_auroc, a_ap = M.pixel_metrics(row_maps, group.row_masks)
    b_auroc, b_ap = M.pixel_metrics(row_maps, group.row_masks, group.row_heads)
    row = {
        "group": group.name,
        "n_images": group.n_images,
        "n_rows": group.n_rows,
        "small_group": group.n_images <= SMALL_GROUP,
        "A_auroc": a_auroc,
        "A_ap": a_ap,
        "B_auroc": b_auroc,
        "B_ap": b_ap,
        "C_auroc": M.image_auroc(group.scores, normal.scores) if normal is not None else M.NAN,
        "aupro": _aupro_with_normals(group, normal),
        "dice_best": dice_best,
        "dice_val_threshold": M.dice_at(group.maps, group.masks, threshold, group.heads),
        "best_threshold": best_threshold,
    }
    if row["small_group"]:
        notes.append(f"only {counted(group.n_images)}: noise")
    row["note"] = "; ".join(notes)
    return row


def whole_test_metrics(groups: dict[str, GroupScores], threshold: float) -> dict[str, Any]:
    """The row ``all``: every distinct test image once (normal ones included), pooled."""
    seen: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float, bool]] = {}
    for group in groups.values():
        for i, path in enumerate(group.paths):
            if path in seen:  # an image in two groups: the union of its masks
                maps, masks, heads, score, anomalous = seen[path]
                seen[path] = (maps, masks | group.masks[i], heads, score, anomalous or group.anomalous)
            else:
                seen[path] = (group.maps[i], group.masks[i], group.heads[i], group.scores[i], group.anomalous)
    maps, masks, heads, scores, anomalous = (np.asarray(column) for column in zip(*seen.values()))
    a_auroc, a_ap = M.pixel_metrics(maps, masks)
    b_auroc, b_ap = M.pixel_metrics(maps, masks, heads)
    dice_best, best_threshold = M.best_dice(maps, masks, heads)
    return {
        "group": "all", "n_images": len(seen), "n_rows": int(sum(g.n_rows for g in groups.values())), "small_group": False,
        "A_auroc": a_auroc, "A_ap": a_ap, "B_auroc": b_auroc, "B_ap": b_ap,
        "C_auroc": M.image_auroc(scores[anomalous], scores[~anomalous]),
        "aupro": M.aupro(maps, masks), "dice_best": dice_best,
        "dice_val_threshold": M.dice_at(maps, masks, threshold, heads), "best_threshold": best_threshold,
        "note": "whole test set, every distinct image once (normal images included)",
    }


def metrics_table(groups: dict[str, GroupScores], threshold: float) -> pd.DataFrame:
    """One row per pathology group (all groups but ``normal``), then ``mean`` (the unweighted mean
    over those groups, ignoring NaN; n_images/n_rows: totals) and ``all`` (:func:`whole_test_metrics`)."""
    normal = groups.get(NORMAL)
    rows = [group_metrics(g, normal, threshold) for name, g in groups.items() if name != NORMAL]
    return with_mean_row(pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), whole_test_metrics(groups, threshold))


def with_mean_row(table: pd.DataFrame, *extra_rows: dict[str, Any]) -> pd.DataFrame:
    """``table`` (one row per group) followed by ``mean`` (the unweighted mean over the groups,
    ignoring NaN; n_images/n_rows: totals) and ``extra_rows``."""
    mean: dict[str, Any] = {"group": "mean", "n_images": int(table["n_images"].sum()), "n_rows": int(table["n_rows"].sum()),
                            "small_group": False, "best_threshold": M.NAN, "note": f"unweighted mean over {len(table)} groups"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN column is NaN, as wanted
        mean |= {column: float(np.nanmean(table[column].to_numpy(dtype=np.float64))) for column in METRIC_COLUMNS}
    table = pd.concat([table, pd.DataFrame([mean, *extra_rows], columns=list(TABLE_COLUMNS))], ignore_index=True)
    return table.astype({"n_images": int, "n_rows": int, "small_group": bool})


# ---------------------------------------------------------------------------- the run
def check_model_matches(model: Padim, settings: Settings) -> None:
    """A model passed in must have been fitted with this run's model-defining settings and training
    data (otherwise the run name, and so the results folder, would describe another model)."""
    check_compatible(model.settings, settings, "the given model")
    theirs, ours = model.settings.data, settings.data
    if (theirs.train_splits, os.path.normpath(theirs.root)) != (ours.train_splits, os.path.normpath(ours.root)):
        raise ModelFileError("the given model was fitted on other training data (data.root / data.train_splits)")


@dataclass
class Run:
    """What every evaluation run shares: its settings, name and folder, the model step, and the
    run's own files (settings and timings). :class:`Evaluation` (images) and
    :class:`utils.volume_evaluation.VolumeEvaluation` (NIfTI volumes) add the data, scoring and
    metrics steps."""

    settings: Settings
    name: str = ""
    directory: str = ""
    bundle: Optional[DataBundle] = None
    model: Optional[Padim] = None
    model_source: str = ""
    reference: Optional[NormalReference] = None
    table: Optional[pd.DataFrame] = None
    figures: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: :func:`utils.data.fingerprint` of the training files (set with the data).
    train_fingerprint: str = ""

    def load_data(self) -> DataBundle:
        raise NotImplementedError

    def _use_data(self, bundle: DataBundle) -> DataBundle:
        """Keep ``bundle`` and name the run after the settings and the files it reads (:func:`run_name`)."""
        self.bundle = bundle
        self.train_fingerprint = fingerprint([bundle.train])
        self.name = run_name(self.settings, fingerprint([bundle.train, bundle.val, *bundle.test.values()]))
        self.directory = os.path.join(self.settings.results_dir, self.name)
        return bundle

    def fit(self, progress: bool = True, model_path: Optional[str] = None, model: Optional[Padim] = None) -> Padim:
        """Fit PaDiM on the training set; or use ``model``, or load ``model_path`` (checked against the settings)."""
        if self.bundle is None:
            self.load_data()
        started = time.perf_counter()
        train = self.bundle.train
        if model is not None:
            check_model_matches(model, self.settings)
            self.model, self.model_source = self._checked(model, "the given model"), "given (fitted before this run)"
        elif model_path is not None:
            self.model = self._checked(Padim.load(model_path, self.settings), model_path)
            self.model_source = f"loaded from {model_path}"
        else:
            self.model = Padim(self.settings).fit(make_loader(train, self.settings), progress=progress)
            self.model.train_fingerprint = self.train_fingerprint
            self.model_source = f"fitted on {train.summary()}"
            self.timings["train_images"] = len(train)
        self.timings["fit_s"] = round(time.perf_counter() - started, 3)
        return self.model

    def _checked(self, model: Padim, what: str) -> Padim:
        """``model`` if it was fitted on this config's training files (the run is named after them)."""
        expected, stored = self.train_fingerprint, model.train_fingerprint
        if not stored:
            self.notes.append(f"{what} does not record its training images (written by older code): not checked "
                              f"against this config's {self.bundle.train.summary()}")
        elif stored != expected:
            raise ModelFileError(f"{what} was fitted on other training images than this config's "
                                 f"{self.bundle.train.summary()} (fingerprint {stored} vs {expected}): evaluate it "
                                 "with the config and data it was fitted on, or refit without --model")
        return model

    def publish_figures(self, folder: str = "sources", prefix: str = "demo_") -> list[str]:
        """Save the figures as PNGs in ``folder`` (the repository's ``sources/``), demo data only.

        Real data (the study's fastMRI images) may not be redistributed, so for any other data
        format nothing is written and ``[]`` is returned.
        """
        if self.settings.data.format != "demo":
            self.notes.append(f"figures not copied to {folder}/: only demo-data figures may be committed")
            return []
        if not self.figures:
            self.make_figures()
        return [save_figure(fig, os.path.join(folder, f"{prefix}{name}.png")) for name, fig in self.figures.items()]

    def _config_yaml(self) -> str:
        header = f"# settings of run {self.name} (written by {type(self).__module__})\n"
        return header + yaml.safe_dump(self.settings.to_dict(), sort_keys=False)

    def _timings(self) -> dict[str, Any]:
        timings = dict(self.timings)
        timings["total_s"] = round(sum(v for k, v in self.timings.items() if k.endswith("_s")), 3)
        device = self.model.device if self.model is not None else None
        timings.update(run_name=self.name, model=self.model_source, device=str(device), torch=torch.__version__,
                       threads=torch.get_num_threads(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return timings


@dataclass
class Evaluation(Run):
    """One evaluation run on images: per-group scores and the metrics table (module docstring)."""

    groups: dict[str, GroupScores] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)

    # -- steps
    def load_data(self) -> DataBundle:
        """Training, validation and test sets (the validation set is held out of training when needed)."""
        started = time.perf_counter()
        self._use_data(load_data(self.settings, ("train", "val", "test")))
        if self.bundle.val is None:
            raise DataError(
                "no validation images for the threshold and colour scale: set data.val_split, or "
                "data.val_fraction > 0 to hold out part of the training images"
            )
        self.timings["load_data_s"] = round(time.perf_counter() - started, 3)
        return self.bundle

    def score(self, progress: bool = True) -> dict[str, GroupScores]:
        """Maps of the normal validation images (threshold, colour scale), then of every test group."""
        if self.model is None:
            raise RuntimeError("call fit() before score()")
        bundle, settings = self.bundle, self.model.settings
        started = time.perf_counter()
        total = len(bundle.val) + sum(len(set(g.paths)) for g in bundle.test.values())
        with tqdm(total=total, desc="score", disable=not progress, unit="img", leave=False) as bar:
            ref_maps, ref_regions, region_kind = reference_maps(self.model, bundle.val, settings, bar)
            self.reference = NormalReference.from_maps(ref_maps, ref_regions, bundle.val_description, region_kind=region_kind)
            self.groups = {}
            for name, dataset in bundle.test.items():
                bar.set_description(f"score {name}")
                self.groups[name] = score_group(self.model, dataset, settings, bar)
        seconds = time.perf_counter() - started
        self.timings.update(score_s=round(seconds, 3), images_scored=total, images_per_second=round(total / max(seconds, 1e-9), 2))
        if NORMAL not in self.groups:
            self.notes.append("no normal test images: (C) image AUROC is undefined")
        return self.groups

    def compute_metrics(self) -> pd.DataFrame:
        """The metrics table (also ``self.table``)."""
        if not self.groups or self.reference is None:
            raise RuntimeError("call score() before compute_metrics()")
        started = time.perf_counter()
        self.table = metrics_table(self.groups, self.reference.threshold)
        self.timings["metrics_s"] = round(time.perf_counter() - started, 3)
        return self.table

    def make_figures(self, examples: int = EXAMPLES_PER_GROUP) -> dict[str, Any]:
        """``{"auroc": AUROC bars, "examples_<group>": example rows, ...}`` as matplotlib figures."""
        if self.table is None:
            self.compute_metrics()
        started = time.perf_counter()
        ref, s = self.reference, self.settings
        figures = {"auroc": auroc_bar_plot(self.table, title=f"AUROC per group: {s.backbone} ({s.weights})")}
        for name, group in self.groups.items():
            if name == NORMAL:
                continue
            chosen = ([i for i in range(group.n_images) if group.masks[i].any()] or list(range(group.n_images)))[:examples]
            figures[f"examples_{name}"] = example_figure(
                group.display[chosen].astype(np.float32), group.masks[chosen], group.maps[chosen],
                threshold=ref.threshold, vmin=ref.vmin, vmax=ref.vmax, heads=group.heads[chosen],
                labels=[os.path.basename(group.paths[i])[:28] for i in chosen],
                title=f"{name}: threshold and colour scale from {ref.source}",
            )
        self.figures = figures
        self.timings["figures_s"] = round(time.perf_counter() - started, 3)
        return figures

    # -- files
    def save(self, save_model: bool = True, figures: bool = True) -> str:
        """Write the results folder as a whole (:func:`utils.files.staged_folder`: an earlier run's
        folder of the same name is replaced, never mixed with these files); returns the folder."""
        if self.table is None:
            raise RuntimeError("call compute_metrics() before save()")
        if figures and not self.figures:
            self.make_figures()
        started = time.perf_counter()
        with staged_folder(self.directory) as folder:
            names = [
                write_atomic(os.path.join(folder, "metrics.csv"), self.table.to_csv(index=False, float_format="%.6f", na_rep="nan").encode()),
                write_atomic(os.path.join(folder, "metrics.md"), report.markdown(self).encode()),
                write_atomic(os.path.join(folder, "config.yaml"), self._config_yaml().encode()),
            ]
            if save_model and self.model is not None:
                names.append(self.model.save(os.path.join(folder, "model.pt")))
            if figures:
                names += [save_figure(fig, os.path.join(folder, "figures", f"{name}.png")) for name, fig in self.figures.items()]
            self.timings["save_s"] = round(time.perf_counter() - started, 3)
            names.append(write_atomic(os.path.join(folder, "timings.json"), json.dumps(self._timings(), indent=2).encode()))
        self.written = [os.path.join(self.directory, os.path.relpath(name, folder)) for name in names]
        return self.directory

    def summary(self) -> str:
        """Plain-text table, notes and timings (what ``python -m utils evaluate`` prints)."""
        return report.summary(self)


def run_fit(settings: Settings, output_path: str | os.PathLike | None, progress: bool = True) -> Optional[str]:
    """Fit on the training set and write the model to ``output_path`` (``None``: ``model.pt`` in the
    run's folder, :func:`utils.evaluation.run_directory`, named after the settings and the training
    files); what ``fit`` on the command line does.

    Alone: an ordinary fit. Under ``torchrun``: the training list is sharded across the ranks,
    the statistics are all-reduced, and rank 0 writes the model atomically. Returns the written
    path on rank 0 (or alone), ``None`` on the other ranks.
    """
    with DistributedContext.from_settings(settings) as ctx:
        prepare_demo(settings, ctx)

        def train_set():
            bundle = load_data(settings, ("train",))
            if bundle.train is None or len(bundle.train) == 0:
                raise DataError("cannot fit PaDiM: the training set is empty")
            return bundle.train

        dataset = ctx.agree("loading the training set", train_set)
        model = distributed_fit(Padim(settings), dataset, settings, ctx, progress=progress)
        if model is None:
            return None
        model.train_fingerprint = fingerprint([dataset])
        if output_path is None:
            output_path = os.path.join(run_directory(settings, model.train_fingerprint), "model.pt")
        return model.save(output_path)
