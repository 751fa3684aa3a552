"""Per-group evaluation under three protocols, figures and results files.

:class:`Evaluation` runs the steps the notebook shows one by one (and :func:`run_evaluation`
runs them all, for ``python -m utils evaluate``), so both write the same files::

    ev = Evaluation(settings)          # run name and folder: results/<run-name>/
    ev.load_data()                     # utils.data.load_data
    ev.fit(progress=True)              # Padim.fit on the training splits (or Padim.load)
    ev.score(progress=True)            # every test group, once; maps kept in memory
    ev.compute_metrics()               # ev.table: one row per group, last row "mean"
    ev.make_figures()                  # example rows per group, AUROC bars
    ev.save()                          # metrics.csv, metrics.md, config.yaml, timings.json, model.pt, figures/

Protocols, per pathology (or defect) group:

- **(A)** the study's: pixel AUROC and average precision over every pixel of the group's rows,
  one row per annotation as the study lists them (a slice with two boxes counts twice, each time
  against one box), whole image.
- **(B)** the same, only pixels inside the row's head mask (box ∪ head-minus-boxes).
- **(C)** image AUROC: the group's distinct images against the normal test images; image score
  ``settings.image_score`` (``max``, or ``top1pct_mean``) of the map inside the head.
- **Dice**: pooled over the group's distinct images (union of their boxes) inside the head:
  ``dice_best`` at the best threshold chosen on the group itself (optimistic), and
  ``dice_val_threshold`` at the threshold from the normal validation maps (the 99th percentile of
  their pixels inside the head: the brain mask beside each image, else an estimate).

Maps are never normalised with test statistics. Every distinct image is scored once; the rows
of (A)/(B) reuse its map. Groups of 1-2 images are flagged ``small_group``: their numbers are noise.
The run name (:func:`run_name`) is derived from every setting that changes a result, so two
different configs never share a results folder and a run never reuses another's files.
"""

from __future__ import annotations

import hashlib
import json
import math
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

from . import metrics as M
from .config import Settings
from .data import NORMAL, DataBundle, ImageSet, load_data, make_loader
from .errors import DataError, ModelFileError
from .model import MODEL_DATA_KEYS, MODEL_KEYS, Padim
from .preprocess import denormalise, foreground_mask, read_mask, resize_mask
from .scoring import image_scores

#: Bump when the meaning of a run's files changes: old names can then never be mistaken for new ones.
RUN_NAME_VERSION = 1
#: Settings that change neither the model nor any number in the results (excluded from the run name).
RUN_TIME_KEYS = ("device", "batch_size", "results_dir", "target_dimension")
RUN_TIME_DATA_KEYS = ("num_workers",)
#: Groups with at most this many distinct images are flagged: their numbers are noise.
SMALL_GROUP = 2
#: Percentile of normal validation pixels (inside the head) used as the decision threshold.
VAL_PERCENTILE = 99.0
#: Without a validation split, this many training images (in-sample) give the reference maps.
FALLBACK_REFERENCE_IMAGES = 32
#: Examples per group in the figures.
EXAMPLES_PER_GROUP = 3
METRIC_COLUMNS = ("A_auroc", "A_ap", "B_auroc", "B_ap", "C_auroc", "dice_best", "dice_val_threshold")
TABLE_COLUMNS = ("group", "n_images", "n_rows", "small_group") + METRIC_COLUMNS + ("best_threshold", "note")


# ---------------------------------------------------------------------------- run names
def run_identity(settings: Settings) -> dict[str, Any]:
    """Every setting that can change a result, canonicalised (what :func:`run_name` hashes).

    Excluded: device, batch size, results folder, worker count and the ``target_dimension``
    check, which change no number. ``data.root`` is normalised (``./data/x/`` = ``data/x``);
    ``data.demo_seed`` counts only for the demo format. A weights file is identified by its
    path and content hash, so replacing the file changes the name.
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


def run_name(settings: Settings) -> str:
    """``<format>-<backbone>-<weights>-<size>px-d<channels>-seed<seed>-<hash>``.

    The readable prefix names the main choices; the 10-hex-digit hash covers the canonical JSON of
    :func:`run_identity` (layers, epsilon, covariance dtype, resize, intensity, splits, data root,
    test groups, blur, image score, ...). Identical settings give the same name; settings that
    differ in anything that changes a result give different names.
    """
    canonical = json.dumps(run_identity(settings), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]
    weights = settings.weights if settings.weights in ("imagenet", "random") else os.path.splitext(os.path.basename(settings.weights))[0]
    prefix = f"{settings.data.format}-{settings.backbone}-{_slug(weights)[:24]}-{settings.image_size}px-d{settings.kept_channels}-seed{settings.seed}"
    return f"{prefix}-{digest}"


def run_directory(settings: Settings) -> str:
    """``<results_dir>/<run-name>`` (not created here)."""
    return os.path.join(settings.results_dir, run_name(settings))


# ---------------------------------------------------------------------------- scored groups
@dataclass
class GroupScores:
    """One test group, scored: arrays per distinct image and per CSV row (annotation).

    ``maps``/``masks``/``heads``/``scores``/``gray`` have one entry per distinct image (first
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
    gray: np.ndarray  # (n, S, S) float16, display images in [0, 1]
    row_image: np.ndarray  # (rows,) int
    row_masks: np.ndarray  # (rows, S, S) bool
    row_heads: np.ndarray  # (rows, S, S) bool

    @property
    def n_images(self) -> int:
        return len(self.paths)

    @property
    def n_rows(self) -> int:
        return len(self.row_image)

    def row_maps(self) -> np.ndarray:
        """``(rows, S, S)``: each row's image map (a copy)."""
        return self.maps[self.row_image]


@dataclass
class NormalReference:
    """Statistics of normal validation maps: the decision threshold and the heat-map colour scale.

    ``threshold``: ``percentile`` of the pixels inside the head (see :func:`reference_region`).
    ``vmin``: their 1st percentile; ``vmax``: the threshold, so that every pixel above the
    threshold saturates the colour scale (the same pixels the thresholded panel shows).
    """

    source: str
    n_images: int
    #: How the heads of the reference images were found: annotated, brain map, estimated.
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


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not show, unit="img", leave=False)


def score_group(model: Padim, dataset: ImageSet, settings: Settings, bar=None) -> GroupScores:
    """Score every distinct image of ``dataset`` once and collect its rows' masks (streaming, by batch).

    The images are read once each (an image listed in several rows, e.g. one row per box, is not
    decoded again); each row's masks come from the mask cache, checked against its image's size.
    """
    shape_of: dict[str, tuple[int, int]] = {}  # distinct images, in scoring order
    maps, gray, masks, heads = [], [], [], []
    for batch in make_loader(dataset.per_image(), settings):
        shape_of.update((path, tuple(shape)) for path, shape in zip(batch["path"], batch["shape"].tolist()))
        masks.append(batch["mask"].numpy().astype(bool))
        heads.append(batch["head"].numpy().astype(bool))
        images = batch["image"]
        maps.append(model.score(images, progress=False).maps.astype(np.float32))
        gray.append(np.stack([denormalise(image) for image in images]).astype(np.float16))
        if bar is not None:
            bar.update(len(images))
    if not shape_of:
        raise DataError(f"test group {dataset.name!r} holds no images")
    index_of = {path: index for index, path in enumerate(shape_of)}
    rows = np.asarray([index_of[item.image] for item in dataset.items], dtype=np.int64)
    row_pairs = [dataset.masks(row, shape_of[item.image]) for row, item in enumerate(dataset.items)]
    row_masks_a = np.stack([mask.numpy() for mask, _ in row_pairs])
    row_heads_a = np.stack([head.numpy() for _, head in row_pairs])
    masks, heads = np.concatenate(masks), np.concatenate(heads)
    heads[~heads.any(axis=(1, 2))] = True  # an empty head mask: fall back to the whole image
    all_maps = np.concatenate(maps)
    scores = image_scores(torch.from_numpy(all_maps), settings.image_score, torch.from_numpy(heads)).numpy()
    return GroupScores(
        name=dataset.name,
        anomalous=bool(getattr(dataset, "anomalous", dataset.name != NORMAL)),
        paths=list(index_of),
        maps=all_maps,
        masks=masks,
        heads=heads,
        scores=scores.astype(np.float64),
        gray=np.concatenate(gray),
        row_image=rows,
        row_masks=row_masks_a,
        row_heads=row_heads_a,
    )


#: Study layout: a fastMRI slice ``x.png`` has its brain mask beside it as ``x_brain_map_full.png``.
BRAIN_MAP_SUFFIX = "_brain_map_full.png"


def reference_region(path: str, image: torch.Tensor, head: torch.Tensor, settings: Settings) -> tuple[np.ndarray, str]:
    """The head of a normal reference (validation) image, and where it came from.

    In order: the dataset's own head mask when it has one (not all True); the study layout's
    brain mask beside the image (``<stem>_brain_map_full.png``); otherwise an estimate from the
    image itself (:func:`utils.preprocess.foreground_mask`, which also takes in the skull).
    """
    head = head.numpy().astype(bool)
    if not head.all():
        return head, "annotated"
    brain_map = os.path.splitext(path)[0] + BRAIN_MAP_SUFFIX
    if os.path.isfile(brain_map):
        mask = read_mask(brain_map)
        if mask.any():
            return resize_mask(mask, settings.image_size, settings.data.resize).numpy(), "brain map"
    return foreground_mask(torch.from_numpy(denormalise(image))).numpy(), "estimated"


def reference_maps(model: Padim, dataset: ImageSet, settings: Settings, limit: Optional[int] = None,
                   bar=None) -> tuple[np.ndarray, np.ndarray, str]:
    """Maps of normal images, their head regions (:func:`reference_region`) and how those were found."""
    maps, regions, kinds, seen = [], [], set(), 0
    for batch in make_loader(dataset, settings):
        images = batch["image"]
        if limit is not None:
            images = images[: max(0, limit - seen)]
        if len(images) == 0:
            break
        maps.append(model.score(images, progress=False).maps.astype(np.float32))
        for path, image, head in zip(batch["path"], images, batch["head"]):
            region, kind = reference_region(path, image, head, settings)
            regions.append(region)
            kinds.add(kind)
        seen += len(images)
        if bar is not None:
            bar.update(len(images))
    return np.concatenate(maps), np.stack(regions), "+".join(sorted(kinds))


# ---------------------------------------------------------------------------- metrics
def group_metrics(group: GroupScores, normal: Optional[GroupScores], threshold: float) -> dict[str, Any]:
    """One table row for a pathology group (see the module docstring for the protocols)."""
    notes = []
    row_maps = group.row_maps()
    reason = M.degenerate_reason(group.row_masks)
    if reason:
        notes.append(f"A: {reason}")
    inside = group.row_masks[group.row_heads]
    reason_b = M.degenerate_reason(inside)
    if reason_b and not reason:
        notes.append(f"B: {reason_b} inside the head")
    if normal is None or normal.n_images == 0:
        notes.append("C: no normal test images")
    dice_best, best_threshold = M.best_dice(group.maps, group.masks, group.heads)
    whole, head = M.pixel_metrics_whole_and_region(row_maps, group.row_masks, group.row_heads)
    row = {
        "group": group.name,
        "n_images": group.n_images,
        "n_rows": group.n_rows,
        "small_group": group.n_images <= SMALL_GROUP,
        "A_auroc": whole[0],
        "A_ap": whole[1],
        "B_auroc": head[0],
        "B_ap": head[1],
        "C_auroc": M.image_auroc(group.scores, normal.scores) if normal is not None else M.NAN,
        "dice_best": dice_best,
        "dice_val_threshold": M.dice_at(group.maps, group.masks, threshold, group.heads),
        "best_threshold": best_threshold,
    }
    if row["small_group"]:
        notes.append(f"only {group.n_images} image{'s' if group.n_images > 1 else ''}: noise")
    row["note"] = "; ".join(notes)
    return row


def metrics_table(groups: dict[str, GroupScores], threshold: float) -> pd.DataFrame:
    """One row per pathology group (all groups but ``normal``), then a row ``mean`` (the
    unweighted mean over those groups, ignoring NaN; n_images/n_rows: totals)."""
    normal = groups.get(NORMAL)
    rows = [group_metrics(g, normal, threshold) for name, g in groups.items() if name != NORMAL]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    mean: dict[str, Any] = {"group": "mean", "n_images": int(table["n_images"].sum()),
                            "n_rows": int(table["n_rows"].sum()), "small_group": False, "best_threshold": M.NAN}
    for column in METRIC_COLUMNS:
        values = table[column].to_numpy(dtype=np.float64)
        mean[column] = float(np.nanmean(values)) if np.isfinite(values).any() else M.NAN
    mean["note"] = f"unweighted mean over {len(rows)} groups"
    table = pd.concat([table, pd.DataFrame([mean], columns=list(TABLE_COLUMNS))], ignore_index=True)
    table["n_images"] = table["n_images"].astype(int)
    table["n_rows"] = table["n_rows"].astype(int)
    table["small_group"] = table["small_group"].astype(bool)
    return table


def mean_without_small(table: pd.DataFrame) -> dict[str, float]:
    """Means of the metric columns over the groups with more than :data:`SMALL_GROUP` images."""
    body = table[(table["group"] != "mean") & ~table["small_group"]]
    return {c: (float(np.nanmean(body[c])) if np.isfinite(body[c].to_numpy(np.float64)).any() else M.NAN) for c in METRIC_COLUMNS}


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """The metrics table as GitHub markdown; small groups marked †, the mean row in bold."""
    headers = ["group", "images", "rows", "(A) AUROC", "(A) AP", "(B) AUROC", "(B) AP", "(C) AUROC",
               "Dice best (optimistic)", "Dice @ val thr."]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for _, row in table.iterrows():
        name = str(row["group"])
        if name == "mean":
            name = "**mean**"
        elif row["small_group"]:
            name += " †"
        cells = [name, str(row["n_images"]), str(row["n_rows"])] + [_fmt(row[c]) for c in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the run
def _check_model_matches(model: Padim, settings: Settings) -> None:
    """A model passed in must have been fitted with this run's model-defining settings
    (otherwise the run name, and so the results folder, would describe another model)."""
    theirs, ours = model.settings, settings
    differences = [f"{k}: model {getattr(theirs, k)!r} vs settings {getattr(ours, k)!r}"
                   for k in MODEL_KEYS if getattr(theirs, k) != getattr(ours, k)]
    differences += [f"data.{k}: model {getattr(theirs.data, k)!r} vs settings {getattr(ours.data, k)!r}"
                    for k in MODEL_DATA_KEYS if getattr(theirs.data, k) != getattr(ours.data, k)]
    if theirs.data.train_splits != ours.data.train_splits or theirs.data.root != ours.data.root:
        differences.append("training data (data.root / data.train_splits)")
    if differences:
        raise ModelFileError(f"the given model was fitted with other settings ({'; '.join(differences)})")


@dataclass
class Evaluation:
    """One evaluation run: its settings, name and folder, and what each step produced.

    ``run_evaluation`` returns it; ``summary()`` is the text the command line prints.
    """

    settings: Settings
    name: str = ""
    directory: str = ""
    bundle: Optional[DataBundle] = None
    model: Optional[Padim] = None
    model_source: str = ""
    groups: dict[str, GroupScores] = field(default_factory=dict)
    reference: Optional[NormalReference] = None
    table: Optional[pd.DataFrame] = None
    figures: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.name or run_name(self.settings)
        self.directory = self.directory or os.path.join(self.settings.results_dir, self.name)

    # -- steps
    def load_data(self, splits: tuple[str, ...] = ("train", "val", "test")) -> DataBundle:
        started = time.perf_counter()
        self.bundle = load_data(self.settings, splits)
        self.timings["load_data_s"] = round(time.perf_counter() - started, 3)
        return self.bundle

    def fit(self, progress: bool = True, model_path: Optional[str] = None, model: Optional[Padim] = None) -> Padim:
        """Fit PaDiM on the training set; or use ``model``, or load ``model_path`` (checked against the settings)."""
        started = time.perf_counter()
        if model is not None:
            _check_model_matches(model, self.settings)
            self.model, self.model_source = model, "given (fitted before this run)"
        elif model_path is not None:
            self.model, self.model_source = Padim.load(model_path, self.settings), f"loaded from {model_path}"
            _ = self.model.embedder  # build the backbone now, so that its start-up is not counted as scoring time
        else:
            bundle = self.bundle if self.bundle is not None and self.bundle.train is not None else None
            train = bundle.train if bundle is not None else load_data(self.settings, ("train",)).train
            self.model = Padim(self.settings).fit(make_loader(train, self.settings), progress=progress)
            self.model_source = f"fitted on {len(train)} training images ({'+'.join(self.settings.data.train_splits)})"
            self.timings["train_images"] = len(train)
        self.timings["fit_s"] = round(time.perf_counter() - started, 3)
        return self.model

    def score(self, progress: bool = True) -> dict[str, GroupScores]:
        """Maps of every test group (each distinct image once) and of the normal validation images."""
        if self.model is None:
            raise RuntimeError("call fit() before score()")
        if self.bundle is None or not self.bundle.test:
            self.bundle = load_data(self.settings, ("val", "test"))
        bundle, settings = self.bundle, self.model.settings
        started = time.perf_counter()
        val = bundle.val
        if val is not None:
            reference_set, limit, source = val, None, f"{settings.data.val_split} ({len(val)} normal validation images)"
        else:
            train = bundle.train if bundle.train is not None else load_data(settings, ("train",)).train
            reference_set, limit = train, FALLBACK_REFERENCE_IMAGES
            source = f"first {min(limit, len(train))} training images (in-sample: no validation split; threshold biased low)"
            self.notes.append(f"no validation split: threshold and colour scale from the {source}")
        total = sum(len(set(g.paths)) for g in bundle.test.values()) + min(len(reference_set), limit or len(reference_set))
        with _progress(total, "score", progress) as bar:
            ref_maps, ref_regions, region_kind = reference_maps(self.model, reference_set, settings, limit, bar)
            self.reference = NormalReference.from_maps(ref_maps, ref_regions, source, region_kind=region_kind)
            self.groups = {}
            for name, dataset in bundle.test.items():
                bar.set_description(f"score {name}")
                self.groups[name] = score_group(self.model, dataset, settings, bar)
        seconds = time.perf_counter() - started
        scored = len(ref_maps) + sum(g.n_images for g in self.groups.values())
        self.timings.update(score_s=round(seconds, 3), images_scored=scored,
                            images_per_s=round(scored / seconds, 2) if seconds > 0 else None)
        if NORMAL not in self.groups:
            self.notes.append("no normal test images: (C) image AUROC is undefined")
        return self.groups

    def compute_metrics(self) -> pd.DataFrame:
        """The metrics table (also ``self.table``)."""
        if not self.groups or self.reference is None:
            raise RuntimeError("call score() before compute_metrics()")
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN columns
            self.table = metrics_table(self.groups, self.reference.threshold)
        self.timings["metrics_s"] = round(time.perf_counter() - started, 3)
        return self.table

    def example_indices(self, group: GroupScores, count: int = EXAMPLES_PER_GROUP) -> list[int]:
        """Deterministic examples: the group's first ``count`` distinct images with a box."""
        with_box = [i for i in range(group.n_images) if group.masks[i].any()] or list(range(group.n_images))
        return with_box[:count]

    def make_figures(self, examples: int = EXAMPLES_PER_GROUP) -> dict[str, Any]:
        """``{"auroc": AUROC bars, "examples_<group>": example rows, ...}`` as :class:`~utils.plotting.RasterFigure`."""
        from .plotting import auroc_bar_plot, example_figure

        if self.table is None:
            self.compute_metrics()
        started = time.perf_counter()
        ref = self.reference
        figures = {"auroc": auroc_bar_plot(self.table, title=f"AUROC per group: {self.settings.backbone} ({self.settings.weights})")}
        for name, group in self.groups.items():
            if name == NORMAL:
                continue
            chosen = self.example_indices(group, examples)
            figures[f"examples_{name}"] = example_figure(
                [group.gray[i].astype(np.float32) for i in chosen],
                [group.masks[i] for i in chosen],
                [group.maps[i] for i in chosen],
                threshold=ref.threshold, vmin=ref.vmin, vmax=ref.vmax,
                heads=[group.heads[i] for i in chosen],
                labels=[os.path.basename(group.paths[i])[:28] for i in chosen],
                title=f"{name}: threshold and colour scale from {ref.source.split(' (')[0]}",
            )
        self.figures = figures
        self.timings["figures_s"] = round(time.perf_counter() - started, 3)
        return figures

    # -- files
    def markdown(self) -> str:
        """``metrics.md``: settings line, the table, and what every column means."""
        s, ref = self.settings, self.reference
        small = mean_without_small(self.table)
        lines = [
            f"# PaDiM evaluation `{self.name}`",
            "",
            f"Backbone `{s.backbone}`, weights `{s.weights}`, layers {s.layers}, {s.kept_channels} channels, "
            f"{s.image_size} px, seed {s.seed}; data `{s.data.format}` at `{s.data.root}`; model {self.model_source}.",
            f"Normal test images: {self.groups[NORMAL].n_images if NORMAL in self.groups else 0}. "
            f"Validation threshold {ref.threshold:.4g} ({ref.percentile:g}th percentile of {ref.source}, inside the head: "
            f"{ref.region_kind}).",
            "",
            markdown_table(self.table),
            "",
            f"Mean without the † groups: (A) AUROC {_fmt(small['A_auroc'])}, (B) AUROC {_fmt(small['B_auroc'])}, "
            f"(C) AUROC {_fmt(small['C_auroc'])}.",
            "",
            "- (A) the study's protocol: pixel AUROC / average precision (scikit-learn) over all pixels of the "
            "group's rows (one per annotation), whole image.",
            "- (B) the same, only pixels inside the head mask.",
            f"- (C) image AUROC: the group's distinct images against the normal test images; image score: "
            f"`{s.image_score}` of the map inside the head.",
            "- Dice over the group's distinct images (union of boxes), inside the head. *Dice best is optimistic*: "
            "its threshold is chosen on the test group itself. Dice @ val thr. uses the validation threshold.",
            f"- † groups with 1-{SMALL_GROUP} images: their numbers are noise. Maps are never min-max normalised.",
        ]
        notes = [f"{row['group']}: {row['note']}" for _, row in self.table.iterrows()
                 if row["note"] and row["group"] != "mean" and not str(row["note"]).startswith("only ")]
        notes += self.notes
        if notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in notes]
        return "\n".join(lines) + "\n"

    def save(self, save_model: bool = True, figures: bool = True) -> str:
        """Write the results folder atomically, file by file; returns the folder."""
        from .files import write_atomic
        from .plotting import save_figure

        if self.table is None:
            raise RuntimeError("call compute_metrics() before save()")
        started = time.perf_counter()
        folder = self.directory
        os.makedirs(folder, exist_ok=True)
        written = [
            write_atomic(os.path.join(folder, "metrics.csv"), self.table.to_csv(index=False, float_format="%.6f", na_rep="nan").encode()),
            write_atomic(os.path.join(folder, "metrics.md"), self.markdown().encode()),
            write_atomic(os.path.join(folder, "config.yaml"), self._config_yaml().encode()),
        ]
        if save_model and self.model is not None:
            written.append(self.model.save(os.path.join(folder, "model.pt")))
        if figures:
            if not self.figures:
                self.make_figures()
            written += [save_figure(fig, os.path.join(folder, "figures", f"{name}.png")) for name, fig in self.figures.items()]
        self.timings["save_s"] = round(time.perf_counter() - started, 3)
        written.append(write_atomic(os.path.join(folder, "timings.json"), json.dumps(self._timings(), indent=2).encode()))
        self.written = written
        return folder

    def publish_figures(self, folder: str = "sources", prefix: str = "demo_") -> list[str]:
        """Save the figures as small PNGs in ``folder`` (the repository's ``sources/``), demo data only.

        Real data (the study's fastMRI images) may not be redistributed, so for any other data
        format nothing is written and ``[]`` is returned.
        """
        from .plotting import save_figure

        if self.settings.data.format != "demo":
            self.notes.append(f"figures not copied to {folder}/: only demo-data figures may be committed")
            return []
        if not self.figures:
            self.make_figures()
        return [save_figure(fig, os.path.join(folder, f"{prefix}{name}.png")) for name, fig in self.figures.items()]

    def _config_yaml(self) -> str:
        header = f"# settings of run {self.name} (written by utils.evaluation)\n"
        return header + yaml.safe_dump(self.settings.to_dict(), sort_keys=False)

    def _timings(self) -> dict[str, Any]:
        timings = dict(self.timings)
        timings["total_s"] = round(sum(v for k, v in self.timings.items() if k.endswith("_s") and v is not None), 3)
        device = self.model.device if self.model is not None else None
        timings.update(run_name=self.name, model=self.model_source, device=str(device), torch=torch.__version__,
                       threads=torch.get_num_threads(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return timings

    def summary(self) -> str:
        """Plain-text table, notes and timings (what ``python -m utils evaluate`` prints)."""
        if self.table is None:
            return f"run {self.name}: not evaluated yet"
        shown = self.table.drop(columns=["note", "best_threshold"]).copy()
        shown.loc[shown["small_group"], "group"] = shown.loc[shown["small_group"], "group"] + " †"
        text = shown.drop(columns=["small_group"]).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–")
        t = self.timings
        lines = [f"run {self.name}", text, "† 1-2 images: noise.  dice_best is optimistic (threshold chosen on the test group)."]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(
            f"fit {t.get('fit_s', 0):.1f} s, scoring {t.get('score_s', 0):.1f} s ({t.get('images_per_s') or 0:.1f} images/s), "
            f"metrics {t.get('metrics_s', 0):.1f} s"
        )
        if self.written:
            lines.append(f"results written to {self.directory}/")
        return "\n".join(lines)


#: What :func:`run_evaluation` returns.
EvaluationResult = Evaluation


def run_evaluation(settings: Settings, model_path: Optional[str] = None, progress: bool = True,
                   model: Optional[Padim] = None, figures: bool = True, save_model: bool = True) -> Evaluation:
    """Fit (or load ``model_path``, or use ``model``), score every test group, compute the metrics
    table and write ``results/<run-name>/``: what ``python -m utils evaluate`` and the notebook do."""
    evaluation = Evaluation(settings)
    needs_training = model is None and model_path is None
    evaluation.load_data(("train", "val", "test") if needs_training else ("val", "test"))
    evaluation.fit(progress=progress, model_path=model_path, model=model)
    evaluation.score(progress=progress)
    evaluation.compute_metrics()
    if figures:
        evaluation.make_figures()
    evaluation.save(save_model=save_model, figures=figures)
    return evaluation
