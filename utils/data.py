"""Data sets: the study's layout (and the demo set, which uses it), MVTec AD folders; NIfTI
volumes are in :mod:`utils.volumes`.

Every loader returns the same thing, a :class:`DataBundle` of :class:`ImageSet` groups, whose
items are dicts of tensors (``image`` network input, ``display`` image for figures, ``mask``,
``head``) made by the single path in :mod:`utils.preprocess`, so the notebook, the command line
and the tests do not care where the images came from. A format without a validation split
(MVTec always; the study with ``val_split: null``) gets a seeded ``data.val_fraction`` of its
training images held out of the fit as validation set (:func:`hold_out`).

Study layout (``data.format: study`` or ``demo``; ``data.root`` is the folder holding ``data/``)::

    <root>/data/splits/<split>.csv           column ``filename``, paths like ./data/IXI/x.png,
                                             relative to <root>
    <root>/data/splits/P.csv, P_ann.csv, P_neg.csv   a pathology group, aligned row by row:
                                             image, anomaly box mask, head-minus-boxes mask
    <root>/data/splits/normal_test.csv, normal_test_ann.csv   normal test images, head masks

MVTec AD layout (``data.format: mvtec``; ``data.root`` is one category folder)::

    <root>/train/good/*.png   <root>/test/<defect>/*.png   <root>/ground_truth/<defect>/<name>_mask.png

Every file a split names is checked when the set is loaded (exists, non-empty, decodable
header and chunks, image and mask sizes equal; MVTec: every mask matches an image and, with
``data.color: auto``, a category is all colour or all gray), so problems surface at once as
one-line :class:`~utils.errors.DataError` messages naming the CSV line or file, not mid-run.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import Settings
from .errors import DataError
from .files import file_problem
from .preprocess import COLOR_MODES, IMAGE_SUFFIXES, open_image, prepare, read_image, read_mask, resize_mask

T = TypeVar("T")

#: Group key of the normal test images (study: ``normal_test``; MVTec: ``test/good``).
NORMAL = "normal"
#: Study CSVs with ``P_ann.csv`` that are not pathology groups unless ``data.test_groups`` names them.
EXCLUDED_GROUPS = ("mass_all", "local")
#: Splits :func:`load_data` can build.
SPLITS = ("train", "val", "test")
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

    - ``image``: float32 ``(3, S, S)`` network input (:func:`utils.preprocess.prepare`,
      S = ``settings.input_size``)
    - ``display``: float32 ``(S, S)`` or ``(S, S, 3)`` in [0, 1], the same pixels for figures
    - ``mask``: bool ``(S, S)`` anomaly ground truth (all False for normal images)
    - ``head``: bool ``(S, S)`` head mask (box ∪ neg for pathologies, brain mask for normal test
      images; all True when unknown, e.g. MVTec or training images)
    - ``shape``: the original ``(H, W)``; ``path``: the image file; ``index``: ``i``

    ``paths`` may repeat an image: the study lists a slice once per annotation (its protocol).
    In that row view the head is this row's box ∪ its neg mask, and since the neg mask removes
    every box of the slice, the slice's *other* boxes fall outside the head (neither normal nor
    anomalous for that row). :meth:`per_image` gives one item per distinct image: mask = union of
    its boxes, head = union of its heads (the whole head).
    """

    def __init__(self, name: str, items: Sequence[Item], settings: Settings, anomalous: bool = False):
        self.name = name
        self.items = list(items)
        self.settings = settings
        #: True for pathology / defect groups, False for normal images.
        self.anomalous = anomalous

    @property
    def paths(self) -> list[str]:
        return [item.image for item in self.items]

    @property
    def files(self) -> list[str]:
        """Every file the set reads: images and their mask files."""
        return [f for item in self.items for f in (item.image, *item.anomaly, *(item.head or ()))]

    @property
    def sources(self) -> list[str]:
        """Where each item was listed (``"mass.csv line 4"``, or the folder for MVTec)."""
        return [item.source for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, {self.summary()})"

    def summary(self) -> str:
        images = len(set(self.paths))
        return counted(images) + (f" ({len(self)} rows)" if len(self) != images else "")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"{self.name}: index {index} out of range 0..{len(self.items) - 1}")
        item = self.items[index]
        array = read_image(item.image, self.settings.data.color)
        image, display = prepare(array, self.settings)
        mask, head = self.masks(index)
        return {
            "image": image,
            "display": display,
            "mask": mask,
            "head": head,
            "shape": torch.tensor(array.shape[:2]),
            "path": item.image,
            "index": index,
        }

    def masks(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``'s anomaly and head masks ``(S, S)`` bool, without decoding the image (all
        True for a head that is not annotated). That each mask has its image's size is checked once,
        when the loaders list the files (:class:`_Checker`)."""
        item = self.items[index]
        size = self.settings.input_size
        head = self._union(item.head) if item.head is not None else torch.ones(size, size, dtype=torch.bool)
        return self._union(item.anomaly), head

    def _union(self, files: Iterable[str]) -> torch.Tensor:
        """Union of the mask ``files`` at the network's size ``(S, S)``."""
        size = self.settings.input_size
        union = torch.zeros(size, size, dtype=torch.bool)
        for file in files:
            union |= resize_mask(read_mask(file), self.settings)
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
        return ImageSet(self.name, items, self.settings, self.anomalous)


@dataclass
class DataBundle:
    """``train`` (normal images), ``val`` (or None), ``test``: group name -> set, in a stable
    order: pathology / defect groups, then ``"normal"`` (normal test images, all-False masks).
    ``val_description`` says where ``val`` came from (a split, or held out of train)."""

    train: Optional[ImageSet]
    val: Optional[ImageSet]
    test: dict[str, ImageSet]
    val_description: str = "no validation set requested"

    def summary(self) -> str:
        """``train 581 images, val 30 images, mass 14 images (16 rows), ...`` (volumes: slices, volumes)."""
        named = [("train", self.train), ("val", self.val), *self.test.items()]
        return ", ".join(f"{name} {group.summary()}" for name, group in named if group is not None)


def load_data(settings: Settings, splits: tuple = SPLITS) -> DataBundle:
    """Build the requested ``splits`` (any of "train", "val", "test") for ``settings.data.format``:
    ``demo`` (study layout at ``data.root``, generated there by :mod:`utils.demo_data` if absent),
    ``study``, ``mvtec`` or ``nifti`` (:mod:`utils.volumes`). Splits not requested are ``None``
    (``test``: empty dict). Without a validation split, ``val`` is held out of the training
    images (``data.val_fraction``, see :func:`hold_out`)."""
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r}; allowed: {', '.join(SPLITS)}")
    fmt = settings.data.format
    if fmt == "nifti":
        from .volumes import load_volume_data

        return load_volume_data(settings, splits)
    if fmt == "demo":
        ensure_demo(settings.data.root, settings.data.demo_seed)
    if fmt in ("demo", "study"):
        return StudyLoader(settings).load(splits)
    if fmt == "mvtec":
        return MvtecLoader(settings).load(splits)
    raise DataError(f"unknown data format {fmt!r}; allowed: demo, study, mvtec, nifti")


def fingerprint(sets: Iterable) -> str:
    """A 12-hex-digit hash of the files ``sets`` read (each set's ``files``): their paths relative
    to the folder they share, their sizes and modification times (whole seconds). Images added,
    removed, renamed or rewritten change it; moving the data set, or copying it with its times
    (``cp -p``, ``rsync -a``), does not."""
    files = sorted({os.path.abspath(f) for s in sets if s is not None for f in s.files})
    if not files:
        return "no-files"
    base = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    stats = [os.stat(f) for f in files]
    listing = "".join(f"{os.path.relpath(f, base)}\t{st.st_size}\t{int(st.st_mtime)}\n" for f, st in zip(files, stats))
    return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:12]  # any file name


def counted(count: int, unit: str = "image") -> str:
    """``1 image``, ``2 images``."""
    return f"{count} {unit}{'s' if count != 1 else ''}"


def hold_out(items: Sequence[T], settings: Settings, origin: str, unit: str = "image") -> tuple[list[T], list[T], str]:
    """Split a seeded (``settings.seed``) ``data.val_fraction`` of ``items`` off as validation.

    Returns ``(kept, held out, description)``, both in their original order. At least one item is
    held out when the fraction is > 0 and there are two items or more, and at least one is kept;
    ``held out`` is empty otherwise. Used for images and for whole volumes alike.
    """
    fraction = settings.data.val_fraction
    if fraction == 0 or len(items) < 2:
        why = "data.val_fraction is 0" if fraction == 0 else f"{origin} has fewer than 2 {unit}s"
        return list(items), [], f"none ({why} and there is no validation split)"
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    order = np.random.default_rng(settings.seed).permutation(len(items))
    held, kept = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    description = f"{fraction:.0%} of {origin} held out (seed {settings.seed}, {counted(count, unit)})"
    return [items[i] for i in kept], [items[i] for i in held], description


def _hold_out_images(train: ImageSet, origin: str) -> tuple[ImageSet, Optional[ImageSet], str]:
    kept, held, description = hold_out(train.items, train.settings, origin)
    return ImageSet(train.name, kept, train.settings), ImageSet("val", held, train.settings) if held else None, description


def ensure_demo(root: str, seed: int = 0) -> None:
    """Generate the demo set at ``root`` unless a study-layout set is already there."""
    if os.path.isdir(os.path.join(root, "data", "splits")):
        return
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"data.root {root} is a file; point data.root at an absent or empty folder to generate the demo set there")
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
            raise DataError(f"data.root {root} was filled by another process while the demo set was generated there") from None
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
    """Checks each file once: exists, non-empty, within the pixel limit, decodable; remembers its
    size (width, height) and whether it holds colour.

    With ``skip_bad`` the pixels are decoded too, so a file whose header and chunks are fine but
    whose data are not (a truncated JPEG) is skipped here, not mid-run; otherwise Pillow's
    ``verify()`` checks the structure and a decode failure later is one :class:`DataError`.
    """

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self._found: dict[str, tuple[tuple[int, int], bool] | DataError] = {}

    def size(self, path: str, source: str) -> Optional[tuple[int, int]]:
        """``(width, height)``; ``None`` if the file is bad and may be skipped (a warning is issued)."""
        if path not in self._found:
            self._found[path] = self._inspect(path)
        result = self._found[path]
        if isinstance(result, tuple):
            return result[0]
        if problem := file_problem(path):
            raise DataError(f"{source}: file {problem}: {path}")
        if self.skip_bad:
            warnings.warn(f"skipping {source}: {result} (data.skip_bad_images is true)", SkippedImageWarning, stacklevel=2)
            return None
        raise DataError(f"{source}: {result}; fix or remove it, or set data.skip_bad_images: true to skip it")

    def _inspect(self, path: str) -> tuple[tuple[int, int], bool] | DataError:
        try:
            with open_image(path) as image:
                found = image.size, image.mode in COLOR_MODES
                image.load() if self.skip_bad else image.verify()
            return found
        except DataError as exc:
            return exc

    def same_colour(self, groups: Sequence[Optional["ImageSet"]], root: str, color: str) -> None:
        """With ``data.color: auto`` every checked image of a data set must be colour, or every one
        gray (a batch cannot hold both)."""
        if color != "auto":
            return
        checked = [(p, self._found[p]) for g in groups if g is not None for p in g.paths if isinstance(self._found.get(p), tuple)]
        colour, gray = [p for p, (_, c) in checked if c], [p for p, (_, c) in checked if not c]
        if colour and gray:
            fewer, kind = (colour, "colour") if len(colour) <= len(gray) else (gray, "gray")
            raise DataError(
                f"{root} mixes colour and gray images ({len(colour)} colour, {len(gray)} gray; {kind}: "
                f"{', '.join(fewer[:3])}{' ...' if len(fewer) > 3 else ''}); set data.color: gray or rgb to read them alike"
            )

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
        if problem := file_problem(path):
            available = sorted(f[:-4] for f in os.listdir(self.split_dir) if f.endswith(".csv") and os.path.isfile(os.path.join(self.split_dir, f)))
            raise DataError(f"split CSV {problem}: {path}; available: {', '.join(available) or 'none'}")
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
        bundle = self._sets(splits)
        self.check.same_colour([bundle.train, bundle.val, *bundle.test.values()], self.root, self.settings.data.color)
        return bundle

    def _sets(self, splits: Sequence[str]) -> DataBundle:
        d = self.settings.data
        test = self.test() if "test" in splits else {}
        if d.val_split:
            val = self.plain(d.val_split, d.val_split) if "val" in splits else None
            train = self.train() if "train" in splits else None
            description = f"{d.val_split} ({counted(len(val))})" if val is not None else "no validation set requested"
            return DataBundle(train, val, test, description)
        if not {"train", "val"} & set(splits):
            return DataBundle(None, None, test)
        train, val, description = _hold_out_images(self.train(), "the training splits")
        return DataBundle(train if "train" in splits else None, val if "val" in splits else None, test, description)

    def train(self) -> ImageSet:
        seen, items = set(), []
        for split in self.settings.data.train_splits:
            for path, source in self.read_csv(split):
                if path in seen:
                    continue
                seen.add(path)
                if self.check.row(source, path, ()):
                    items.append(Item(path, (), None, source))
        return ImageSet("train", _usable("training splits " + "+".join(self.settings.data.train_splits), items), self.settings)

    def plain(self, name: str, split: str) -> ImageSet:
        items = [Item(p, (), None, s) for p, s in self.read_csv(split) if self.check.row(s, p, ())]
        return ImageSet(name, _usable(split, items), self.settings)

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
        return ImageSet(group, _usable(group, items), self.settings, anomalous=True)

    def normal_test(self) -> ImageSet:
        images, heads = self._aligned(["normal_test", "normal_test_ann"])
        items = [
            Item(image, (), (head,), source)
            for (image, source), (head, _) in zip(images, heads)
            if self.check.row(f"{source} (with normal_test_ann)", image, (head,))
        ]
        return ImageSet(NORMAL, _usable("normal_test", items), self.settings)


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
        test = self.test() if "test" in splits else {}
        if not {"train", "val"} & set(splits):
            self.check.same_colour(list(test.values()), self.root, self.settings.data.color)
            return DataBundle(None, None, test)
        folder = os.path.join(self.root, "train", "good")
        items = [Item(p, (), None, folder) for p in self._images(folder) if self.check.row(folder, p, ())]
        train = ImageSet("train", _usable(folder, items), self.settings)
        self.check.same_colour([train, *test.values()], self.root, self.settings.data.color)
        train, val, description = _hold_out_images(train, "train/good")
        return DataBundle(train if "train" in splits else None, val if "val" in splits else None, test, description)

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
        test = {defect: self.defect(defect) for defect in defects}
        folder = os.path.join(test_dir, "good")
        items = [Item(p, (), None, folder) for p in self._images(folder) if self.check.row(folder, p, ())]
        test[NORMAL] = ImageSet(NORMAL, _usable(folder, items), self.settings)
        return test

    def defect(self, defect: str) -> ImageSet:
        """``test/<defect>``, each image with its ``ground_truth/<defect>/<name>_mask.png``."""
        folder = os.path.join(self.root, "test", defect)
        masks_dir = os.path.join(self.root, "ground_truth", defect)
        images = self._images(folder)
        if not os.path.isdir(masks_dir):
            raise DataError(f"defect folder {folder} has no masks: {masks_dir} not found (MVTec keeps them in ground_truth/<defect>)")
        stems = {os.path.splitext(os.path.basename(p))[0] for p in images}
        for name in sorted(os.listdir(masks_dir)):
            stem = os.path.splitext(name)[0]
            if not name.startswith(".") and (not stem.endswith("_mask") or stem[: -len("_mask")] not in stems):
                raise DataError(
                    f"mask {os.path.join(masks_dir, name)} matches no image in {folder} "
                    f"(expected <image name>_mask.png for an image <image name>.png there)"
                )
        items = []
        for image in images:
            mask = os.path.join(masks_dir, os.path.splitext(os.path.basename(image))[0] + "_mask.png")
            if not os.path.isfile(mask):
                raise DataError(f"no ground-truth mask for {image}: expected {mask}")
            if self.check.row(image, image, (mask,)):
                items.append(Item(image, (mask,), None, folder))
        return ImageSet(defect, _usable(folder, items), self.settings, anomalous=True)
