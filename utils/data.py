"""Data sets: the study's layout (and the demo set, which uses it), MVTec AD folders.

Every loader returns the same thing, a :class:`DataBundle` of :class:`ImageSet` groups, whose
items are dicts of preprocessed tensors (``image``, ``mask``, ``head``) made by the single path
in :mod:`utils.preprocess`, so the notebook, the command line and the tests do not care where
the images came from.

Study layout (``data.format: study`` or ``demo``; ``data.root`` is the folder holding ``data/``)::

    <root>/data/splits/<split>.csv           column ``filename``, paths like ./data/IXI/x.png,
                                             relative to <root>
    <root>/data/splits/P.csv, P_ann.csv, P_neg.csv   a pathology group, aligned row by row:
                                             image, anomaly box mask, head-minus-boxes mask
    <root>/data/splits/normal_test.csv, normal_test_ann.csv   normal test images, head masks

MVTec AD layout (``data.format: mvtec``; ``data.root`` is one category folder)::

    <root>/train/good/*.png   <root>/test/<defect>/*.png   <root>/ground_truth/<defect>/<name>_mask.png

Every file a split names is checked when the set is loaded (exists, non-empty, decodable
header and chunks, image and mask sizes equal), so problems surface at once as one-line
:class:`~utils.errors.DataError` messages naming the CSV line or file, not mid-run.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import Settings
from .errors import DataError
from .preprocess import MAX_PIXELS, preprocess, read_grayscale, read_mask, resize_mask

#: Group key of the normal test images (study: ``normal_test``; MVTec: ``test/good``).
NORMAL = "normal"
#: Study CSVs with ``P_ann.csv`` that are not pathology groups unless ``data.test_groups`` names them.
EXCLUDED_GROUPS = ("mass_all", "local")
#: Splits :func:`load_data` can build.
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
STUDY_DOWNLOAD_HINT = (
    "download the study's data.zip from its release page and unzip it so that {root}/data/IXI, "
    "{root}/data/fastMRI and {root}/data/splits exist, or set data.format: demo (see data/README.md)"
)


class SkippedImageWarning(UserWarning):
    """An unreadable image (or mask) was skipped because ``data.skip_bad_images`` is true."""


@dataclass(frozen=True)
class Item:
    """One row of a group: the image, the mask files whose union is the anomaly ground truth,
    and the mask files whose union is the head (``None``: head unknown, all True)."""

    image: str
    anomaly: tuple[str, ...] = ()
    head: Optional[tuple[str, ...]] = None
    source: str = ""  # where it was listed, e.g. "mass.csv line 4", for messages


class ImageSet(Dataset):
    """One group of images. Item ``i`` -> dict:

    - ``image``: float32 ``(3, S, S)``, preprocessed (``image_size``, ``data.resize``, ``data.intensity``)
    - ``mask``: bool ``(S, S)`` anomaly ground truth (all False for normal images)
    - ``head``: bool ``(S, S)`` head mask (box ∪ neg for pathologies, brain mask for normal test
      images; all True when unknown, e.g. MVTec or training images)
    - ``path``: the image file; ``index``: ``i``

    ``paths`` may repeat an image: the study lists a slice once per annotation (its protocol).
    In that row view the head is this row's box ∪ its neg mask, and since the neg mask removes
    every box of the slice, the slice's *other* boxes fall outside the head (neither normal nor
    anomalous for that row). :meth:`per_image` gives one item per distinct image: mask = union of
    its boxes, head = union of its heads (the whole head).
    """

    def __init__(self, name: str, items: Sequence[Item], image_size: int, resize: str = "pad",
                 intensity: str = "none", anomalous: bool = False):
        self.name = name
        self.items = list(items)
        self.image_size = image_size
        self.resize = resize
        self.intensity = intensity
        #: True for pathology / defect groups, False for normal images.
        self.anomalous = anomalous

    @classmethod
    def from_settings(cls, name: str, items: Sequence[Item], settings: Settings, anomalous: bool = False) -> "ImageSet":
        d = settings.data
        return cls(name, items, settings.image_size, d.resize, d.intensity, anomalous)

    @property
    def paths(self) -> list[str]:
        return [item.image for item in self.items]

    @property
    def sources(self) -> list[str]:
        """Where each item was listed (``"mass.csv line 4"``, or the folder for MVTec)."""
        return [item.source for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, {len(self)} items, {len(set(self.paths))} images)"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"{self.name}: index {index} out of range 0..{len(self.items) - 1}")
        item = self.items[index]
        gray = read_grayscale(item.image)
        mask, head = self.masks(index, gray.shape)
        return {
            "image": preprocess(gray, self.image_size, self.resize, self.intensity),
            "mask": mask,
            "head": head,
            "shape": torch.tensor(gray.shape),
            "path": item.image,
            "index": index,
        }

    def masks(self, index: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``'s anomaly and head masks ``(S, S)`` bool for its image of ``shape``
        ``(H, W)``, without decoding the image (all True for a head that is not annotated)."""
        item = self.items[index]
        size = self.image_size
        head = self._union(item.head, shape, item) if item.head is not None else torch.ones(size, size, dtype=torch.bool)
        return self._union(item.anomaly, shape, item), head

    def _union(self, files: Iterable[str], shape: tuple[int, int], item: Item) -> torch.Tensor:
        """Union of the mask ``files`` at the network's size ``(S, S)`` (nearest-neighbour resizing
        commutes with the union); each file must have the image's ``shape``."""
        union = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
        for file in files:
            mask_shape, resized = _MASKS.get(file, self.image_size, self.resize)
            if mask_shape != shape:
                raise DataError(
                    f"{item.source or item.image}: mask {file} is {mask_shape[1]}x{mask_shape[0]} "
                    f"but image {item.image} is {shape[1]}x{shape[0]}"
                )
            union |= resized
        return union

    def per_image(self) -> "ImageSet":
        """One item per distinct image (first-appearance order); mask = union of its boxes,
        head = union of its heads."""
        merged: dict[str, list] = {}
        for item in self.items:
            entry = merged.setdefault(item.image, [[], [], item.source, item.head is not None])
            entry[0].extend(f for f in item.anomaly if f not in entry[0])
            if item.head is None:
                entry[3] = False
            else:
                entry[1].extend(f for f in item.head if f not in entry[1])
        items = [
            Item(image, tuple(anomaly), tuple(head) if known else None, source)
            for image, (anomaly, head, source, known) in merged.items()
        ]
        return ImageSet(self.name, items, self.image_size, self.resize, self.intensity, self.anomalous)


class _ResizedMaskCache:
    """Decoded masks at the network's size, by file identity (path, size, modification time),
    least recently used first out, at most ``budget`` bytes.

    An evaluation reads the same mask files many times (an image's head mask in each of its rows,
    boxes listed in several groups): 606 reads of 314 files on the study's test splits, which made
    mask decoding ~0.9 s of a 16 s evaluation. Entries are never modified by their users.
    """

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.entries: "OrderedDict[tuple, tuple[tuple[int, int], torch.Tensor]]" = OrderedDict()

    def get(self, path: str, size: int, mode: str) -> tuple[tuple[int, int], torch.Tensor]:
        """``(original (H, W), (S, S) bool mask)`` of the mask file at ``path``."""
        try:
            stat = os.stat(path)
            key = (path, stat.st_size, stat.st_mtime_ns, size, mode)
        except OSError:
            key = None  # read_mask names the missing file
        if key is not None and key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        mask = read_mask(path)
        entry = (mask.shape, resize_mask(mask, size, mode))
        if key is not None and size * size <= self.budget:
            self.entries[key] = entry
            self.used += size * size
            while self.used > self.budget:
                _, (_, old) = self.entries.popitem(last=False)
                self.used -= old.numel()
        return entry


#: 64 MB: 4096 masks at 128 px.
_MASKS = _ResizedMaskCache(64 * 2**20)


@dataclass
class DataBundle:
    """``train`` (normal images), ``val`` (or None), ``test``: group name -> set, in a stable
    order: pathology / defect groups, then ``"normal"`` (normal test images, all-False masks)."""

    train: Optional[ImageSet]
    val: Optional[ImageSet]
    test: dict[str, ImageSet]

    def summary(self) -> str:
        parts = []
        if self.train is not None:
            parts.append(f"train {len(self.train)}")
        if self.val is not None:
            parts.append(f"val {len(self.val)}")
        parts += [f"{name} {len(group)}" for name, group in self.test.items()]
        return ", ".join(parts)


def load_data(settings: Settings, splits: tuple = SPLITS) -> DataBundle:
    """Build the requested ``splits`` (any of "train", "val", "test") for ``settings.data.format``:
    ``demo`` (study layout at ``data.root``, generated there by :mod:`utils.demo_data` if absent),
    ``study`` or ``mvtec``. Splits not requested are ``None`` (``test``: empty dict)."""
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r}; allowed: {', '.join(SPLITS)}")
    fmt = settings.data.format
    if fmt == "demo":
        ensure_demo(settings.data.root, settings.data.demo_seed)
        return StudyLoader(settings).load(splits)
    if fmt == "study":
        return StudyLoader(settings).load(splits)
    if fmt == "mvtec":
        return MvtecLoader(settings).load(splits)
    raise DataError(f"unknown data format {fmt!r}; allowed: demo, study, mvtec")


def ensure_demo(root: str, seed: int = 0) -> None:
    """Generate the demo set at ``root`` unless a study-layout set is already there."""
    if os.path.isdir(os.path.join(root, "data", "splits")):
        return
    if os.path.isdir(root) and os.listdir(root):
        raise DataError(
            f"data.root {root} exists but holds no demo set ({root}/data/splits is missing); "
            "point data.root at an empty or absent folder to generate the demo there"
        )
    from .demo_data import generate_demo

    try:
        generate_demo(root, seed=seed)
    except FileExistsError:  # another process generated it meanwhile
        if not os.path.isdir(os.path.join(root, "data", "splits")):
            raise DataError(f"data.root {root} was filled by something other than the demo set while generating it") from None
    except OSError as exc:
        raise DataError(f"cannot write the demo set to {root}: {exc.strerror or exc}") from None


def make_loader(dataset: ImageSet, settings: Settings) -> DataLoader:
    """Batches of dicts in dataset order (``batch_size``, ``data.num_workers``, no shuffling)."""
    workers = settings.data.num_workers
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=workers,
        worker_init_fn=_single_thread_worker if workers else None,
        generator=torch.Generator().manual_seed(settings.seed),
        persistent_workers=False,
    )


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers run in parallel already; avoid oversubscribing the cores


# ---------------------------------------------------------------------------- file checks
class _Checker:
    """Checks each file once: exists, non-empty, decodable; remembers its size (width, height)."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self._sizes: dict[str, tuple[int, int] | str] = {}

    def size(self, path: str, source: str) -> Optional[tuple[int, int]]:
        """``(width, height)``; ``None`` if the file is bad and may be skipped (a warning is issued)."""
        if path not in self._sizes:
            self._sizes[path] = _inspect(path)
        result = self._sizes[path]
        if isinstance(result, tuple):
            return result
        if result == "missing":
            raise DataError(f"{source}: file not found: {path}")
        if self.skip_bad:
            warnings.warn(f"skipping {source}: {result} (data.skip_bad_images is true)", SkippedImageWarning, stacklevel=2)
            return None
        raise DataError(f"{source}: {result}; fix or remove it, or set data.skip_bad_images: true to skip it")

    def row(self, source: str, image: str, masks: Sequence[str]) -> bool:
        """Check an image and its masks; False if the row is skipped (bad file, skip mode)."""
        size = self.size(image, source)
        if size is None:
            return False
        for mask in masks:
            mask_size = self.size(mask, source)
            if mask_size is None:
                return False
            if mask_size != size:
                raise DataError(
                    f"{source}: mask {mask} is {mask_size[0]}x{mask_size[1]} but image {image} is {size[0]}x{size[1]}"
                )
        return True


def _inspect(path: str) -> tuple[int, int] | str:
    if not os.path.isfile(path):
        return "missing"
    if os.path.getsize(path) == 0:
        return f"image file is empty (0 bytes): {path}"
    try:
        with Image.open(path) as image:
            size = image.size
            if size[0] * size[1] > MAX_PIXELS:
                return f"image {path} is {size[0]}x{size[1]}, larger than the {MAX_PIXELS:,} pixel limit"
            image.verify()  # chunk structure and checksums, without decoding the pixels
        return size
    except Exception as exc:
        return f"corrupt image {path} ({type(exc).__name__}: {str(exc)[:120]})"


def _usable(groups_name: str, items: list[Item]) -> list[Item]:
    if not items:
        raise DataError(f"{groups_name}: every image was skipped as unreadable; nothing is left to load")
    return items


# ---------------------------------------------------------------------------- study layout
class StudyLoader:
    """The reference study's layout (also the demo set's): split CSVs under ``<root>/data/splits``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.data.root
        self.split_dir = os.path.join(self.root, "data", "splits")
        self.check = _Checker(settings.data.skip_bad_images)
        self._check_root()

    def _check_root(self) -> None:
        root = self.root
        if os.path.isdir(self.split_dir):
            return
        if not os.path.isdir(root):
            raise DataError(f"data.root {root} not found: " + STUDY_DOWNLOAD_HINT.format(root=root))
        if os.path.isdir(os.path.join(root, "splits")):
            parent = os.path.dirname(os.path.normpath(root)) or "."
            raise DataError(f"data.root {root} is the data/ folder itself; set data.root to its parent, {parent}")
        raise DataError(f"data.root {root} has no data/splits folder: " + STUDY_DOWNLOAD_HINT.format(root=root))

    def csv_path(self, name: str) -> str:
        return os.path.join(self.split_dir, name + ".csv")

    def available_groups(self) -> list[str]:
        """Pathology groups: names P with P.csv, P_ann.csv and P_neg.csv (not normal_*), sorted."""
        names = {f[: -len("_ann.csv")] for f in os.listdir(self.split_dir) if f.endswith("_ann.csv")}
        return sorted(
            n for n in names
            if not n.startswith("normal") and os.path.isfile(self.csv_path(n)) and os.path.isfile(self.csv_path(n + "_neg"))
        )

    def read_csv(self, name: str) -> list[tuple[str, str]]:
        """Rows of ``<name>.csv`` as (resolved path, "name.csv line N"); errors on missing/empty CSV."""
        path = self.csv_path(name)
        if not os.path.isfile(path):
            available = sorted(f[:-4] for f in os.listdir(self.split_dir) if f.endswith(".csv"))
            raise DataError(f"split CSV not found: {path}; available: {', '.join(available) or 'none'}")
        label = name + ".csv"
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                lines = list(csv.reader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read split CSV {path}: {exc}") from None
        if not lines or [c.strip() for c in lines[0]][:1] != ["filename"]:
            header = ",".join(lines[0]) if lines else "(empty file)"
            raise DataError(f"{path}: expected a header with column `filename`, found {header[:80]!r}")
        column = 0
        rows = []
        for number, line in enumerate(lines[1:], start=2):
            if not line or not line[column].strip():
                continue
            value = line[column].strip()
            resolved = value if os.path.isabs(value) else os.path.normpath(os.path.join(self.root, value))
            rows.append((resolved, f"{label} line {number}"))
        if not rows:
            raise DataError(f"{path} lists no images (empty split)")
        return rows

    def load(self, splits: Sequence[str]) -> DataBundle:
        d = self.settings.data
        train = self.train() if "train" in splits else None
        val = self.plain(d.val_split, d.val_split) if "val" in splits and d.val_split else None
        test = self.test() if "test" in splits else {}
        return DataBundle(train, val, test)

    def train(self) -> ImageSet:
        seen, items = set(), []
        for split in self.settings.data.train_splits:
            for path, source in self.read_csv(split):
                if path in seen:
                    continue
                seen.add(path)
                if self.check.row(source, path, ()):
                    items.append(Item(path, (), None, source))
        return ImageSet.from_settings("train", _usable("training splits " + "+".join(self.settings.data.train_splits), items), self.settings)

    def plain(self, name: str, split: str) -> ImageSet:
        items = [Item(p, (), None, s) for p, s in self.read_csv(split) if self.check.row(s, p, ())]
        return ImageSet.from_settings(name, _usable(split, items), self.settings)

    def test(self) -> dict[str, ImageSet]:
        requested = self.settings.data.test_groups
        available = self.available_groups()
        if requested is None:
            groups = [g for g in available if g not in EXCLUDED_GROUPS]
        else:
            groups = [g for g in dict.fromkeys(requested) if g != NORMAL]
            for group in groups:
                if group not in available:
                    missing = [f"{n}.csv" for n in (group, group + "_ann", group + "_neg") if not os.path.isfile(self.csv_path(n))]
                    raise DataError(
                        f"data.test_groups names {group!r} but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing in {self.split_dir}; "
                        f"available groups: {', '.join(available) or 'none'}"
                    )
        test = {group: self.pathology(group) for group in groups}
        test[NORMAL] = self.normal_test()
        return test

    def _aligned(self, names: Sequence[str]) -> list[list[tuple[str, str]]]:
        tables = [self.read_csv(name) for name in names]
        counts = [len(t) for t in tables]
        if len(set(counts)) > 1:
            listing = ", ".join(f"{n}.csv has {c}" for n, c in zip(names, counts))
            raise DataError(f"split CSVs must align row by row but {listing} rows")
        return tables

    def pathology(self, group: str) -> ImageSet:
        images, boxes, negs = self._aligned([group, group + "_ann", group + "_neg"])
        items = []
        for (image, source), (box, _), (neg, _) in zip(images, boxes, negs):
            # one check covers the image row and its mask rows, so a skipped image drops its masks too
            if self.check.row(f"{source} (with {group}_ann/_neg)", image, (box, neg)):
                items.append(Item(image, (box,), (box, neg), source))
        return ImageSet.from_settings(group, _usable(group, items), self.settings, anomalous=True)

    def normal_test(self) -> ImageSet:
        images, heads = self._aligned(["normal_test", "normal_test_ann"])
        items = [
            Item(image, (), (head,), source)
            for (image, source), (head, _) in zip(images, heads)
            if self.check.row(f"{source} (with normal_test_ann)", image, (head,))
        ]
        return ImageSet.from_settings(NORMAL, _usable("normal_test", items), self.settings)


# ---------------------------------------------------------------------------- MVTec AD layout
class MvtecLoader:
    """One MVTec AD category: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.data.root
        self.check = _Checker(settings.data.skip_bad_images)
        if not os.path.isdir(self.root):
            raise DataError(
                f"data.root {self.root} not found: for data.format mvtec it must be one MVTec AD category folder "
                f"(with train/good, test/<defect>, ground_truth/<defect>); see data/README.md"
            )

    def _images(self, folder: str) -> list[str]:
        if not os.path.isdir(folder):
            raise DataError(f"MVTec folder not found: {folder} (expected {self.root}/train/good and {self.root}/test/<defect>)")
        files = sorted(
            os.path.join(folder, f) for f in os.listdir(folder)
            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
        )
        if not files:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) (empty split)")
        return files

    def load(self, splits: Sequence[str]) -> DataBundle:
        train = None
        if "train" in splits:
            folder = os.path.join(self.root, "train", "good")
            items = [Item(p, (), None, folder) for p in self._images(folder) if self.check.row(folder, p, ())]
            train = ImageSet.from_settings("train", _usable(folder, items), self.settings)
        return DataBundle(train, None, self.test() if "test" in splits else {})

    def test(self) -> dict[str, ImageSet]:
        test_dir = os.path.join(self.root, "test")
        if not os.path.isdir(test_dir):
            raise DataError(f"MVTec folder not found: {test_dir} (expected {self.root}/test/<defect> and test/good)")
        available = sorted(d for d in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, d)) and d != "good")
        requested = self.settings.data.test_groups
        if requested is None:
            defects = available
        else:
            defects = [g for g in dict.fromkeys(requested) if g != NORMAL]
            for defect in defects:
                if defect not in available:
                    raise DataError(
                        f"data.test_groups names {defect!r} but {test_dir}/{defect} does not exist; "
                        f"available defects: {', '.join(available) or 'none'}"
                    )
        test = {}
        for defect in defects:
            folder = os.path.join(test_dir, defect)
            items = []
            for image in self._images(folder):
                stem = os.path.splitext(os.path.basename(image))[0]
                mask = os.path.join(self.root, "ground_truth", defect, stem + "_mask.png")
                if not os.path.isfile(mask):
                    raise DataError(f"no ground-truth mask for {image}: expected {mask}")
                if self.check.row(image, image, (mask,)):
                    items.append(Item(image, (mask,), None, folder))
            test[defect] = ImageSet.from_settings(defect, _usable(folder, items), self.settings, anomalous=True)
        folder = os.path.join(test_dir, "good")
        items = [Item(p, (), None, folder) for p in self._images(folder) if self.check.row(folder, p, ())]
        test[NORMAL] = ImageSet.from_settings(NORMAL, _usable(folder, items), self.settings)
        return test
