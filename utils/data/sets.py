"""The data every format is turned into: groups of items and a bundle of splits.

Every loader (study layout and demo set, :mod:`utils.data.study`; MVTec AD folders,
:mod:`utils.data.mvtec`; NIfTI volumes, :mod:`utils.data.volumes`) returns a :class:`DataBundle`
of groups whose items are dicts of tensors (``image`` network input, ``display`` image for
figures, ``mask``, ``head``, ``foreground``) made by the single path in
:mod:`utils.data.preprocess`, so the notebook, the command line and the tests do not care where
the images came from. A format without a validation split gets a seeded ``data.val_fraction`` of
its training images (or volumes) held out of the fit as validation set (:func:`hold_out`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..config import Settings
from ..errors import DataError
from .preprocess import prepare, read_image, read_mask, resize_mask

T = TypeVar("T")

#: Splits :func:`utils.data.load_data` can build (and a NIfTI manifest's ``split`` values).
SPLITS = ("train", "val", "test")
#: Group key of the normal test images (study: ``normal_test``; MVTec: ``test/good``).
NORMAL = "normal"
#: Names the metrics table gives rows of its own: no test group of any format may take them.
RESERVED_GROUPS = (NORMAL, "mean", "all")


@dataclass(frozen=True)
class Item:
    """One row of a group: the image, the mask files whose union is the anomaly ground truth,
    and the mask files whose union is the head (``None``: head unknown, all True)."""

    image: str
    anomaly: tuple[str, ...] = ()
    head: Optional[tuple[str, ...]] = None
    source: str = ""  # where it was listed, e.g. "mass.csv line 4", for messages


@dataclass(eq=False)  # compared and hashed by identity, as data sets are
class ImageSet(Dataset):
    """One group of images. Item ``i`` -> dict:

    - ``image``: float32 ``(3, S, S)`` network input (:func:`utils.data.preprocess.prepare`,
      S = ``settings.input_size``)
    - ``display``: float32 ``(S, S)`` or ``(S, S, 3)`` in [0, 1], the same pixels for figures
    - ``mask``: bool ``(S, S)`` anomaly ground truth (all False for normal images)
    - ``head``: bool ``(S, S)`` head mask: the row's given masks (box ∪ neg for pathologies, brain
      mask for normal test and validation images), else the estimate when ``estimate_head`` is set,
      else all True (MVTec, training images)
    - ``foreground``: bool ``(S, S)``, only when the settings use it
      (:attr:`utils.config.Settings.estimates_head`): the head estimated from the image, for the model
    - ``shape``: the original ``(H, W)``; ``path``: the image file; ``index``: ``i``

    ``paths`` may repeat an image: the study lists a slice once per annotation (its protocol).
    In that row view the head is this row's box ∪ its neg mask, and since the neg mask removes
    every box of the slice, the slice's *other* boxes fall outside the head (neither normal nor
    anomalous for that row).
    """

    name: str
    items: list[Item]
    settings: Settings
    #: True for pathology / defect groups, False for normal images.
    anomalous: bool = False
    #: Items without given head masks take the head estimated from the image (reference sets).
    estimate_head: bool = False

    @property
    def paths(self) -> list[str]:
        return [item.image for item in self.items]

    @property
    def rows(self) -> list[tuple]:
        """Per item: the image, its anomaly mask files and its head mask files (None: not given)."""
        return [(item.image, item.anomaly, item.head) for item in self.items]

    @property
    def head_kinds(self) -> set[str]:
        """Where the items' heads come from: ``given mask``, ``estimated`` or ``whole image``."""
        unknown = "estimated" if self.estimate_head else "whole image"
        return {"given mask" if item.head is not None else unknown for item in self.items}

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        images = len(set(self.paths))
        return counted(images) + (f" ({len(self)} rows)" if len(self) != images else "")

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        array = read_image(item.image, self.settings.data.color)
        prepared = prepare(array, self.settings, estimate_head=self.estimate_head)
        mask, head = self.masks(index)
        if item.head is None and self.estimate_head:
            head = prepared.head
        return prepared.item(mask, head, array.shape, item.image, self.settings, index=index)

    def masks(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``'s anomaly and head masks ``(S, S)`` bool, without decoding the image (all
        True for a head that is not given). That each mask has its image's size is checked once,
        when the loaders list the files (:class:`utils.data.checks.Checker`)."""
        item = self.items[index]
        anomaly = self._union(item.anomaly)
        return anomaly, self._union(item.head) if item.head is not None else torch.ones_like(anomaly)

    def _union(self, files: Iterable[str]) -> torch.Tensor:
        """Union of the mask ``files`` at the network's size ``(S, S)``."""
        size = self.settings.input_size
        union = torch.zeros(size, size, dtype=torch.bool)
        for file in files:
            union |= resize_mask(read_mask(file), self.settings)
        return union


def checked_groups(names: Sequence[str], where: str) -> list[str]:
    """``names`` when none is reserved (:data:`RESERVED_GROUPS`, in any case), has spaces around it or differs
    from another only in case: a group named ``normal``, ``mean`` or ``all`` (or ``mean `` printed as ``mean``)
    would be replaced by, or printed beside, the table's own row of that name; ``Mass`` beside ``mass`` is one
    group split in two (and one figure file where case is ignored)."""
    keys = [name.strip().casefold() for name in names]
    taken = [name for name, key in zip(names, keys)
             if key in RESERVED_GROUPS or name != name.strip() or keys.count(key) > 1]
    if taken:
        raise DataError(f"{where}: a test group is named {taken[0]!r}; names with spaces around them, names that "
                        f"differ from another only in case and the names the results table uses for its own rows "
                        f"({', '.join(RESERVED_GROUPS)}) are refused; rename it")
    return list(names)


def chosen_groups(requested: Optional[Sequence[str]], available: Sequence[str], where: str) -> list[str]:
    """The test groups to load: ``data.test_groups`` (``requested``; each once, ``normal`` left to the
    loader) or else every ``available`` group of ``where``; none reserved (:func:`checked_groups`)."""
    if requested is None:
        return checked_groups(available, where)
    return checked_groups([group for group in dict.fromkeys(requested) if group != NORMAL], "data.test_groups")


@dataclass
class DataBundle:
    """``train`` (normal images), ``val`` (or None), ``test``: group name -> set, in a stable
    order: pathology / defect groups, then ``"normal"`` (normal test images, all-False masks).
    ``val_description`` says where ``val`` came from (a split, or held out of train);
    ``train_digests`` identifies the training files' content (:func:`utils.data.load.file_digests`),
    ``train_kind`` says whether every training image is ``colour`` or ``gray`` ("" if mixed or volumes)."""

    train: Optional[ImageSet]
    val: Optional[ImageSet]
    test: dict[str, ImageSet]
    val_description: str = "no validation set requested"
    train_digests: Optional[torch.Tensor] = None
    train_kind: str = ""

    def summary(self) -> str:
        """``train 581 images, val 30 images, mass 14 images (16 rows), ...`` (volumes: slices, volumes)."""
        named = [("train", self.train), ("val", self.val), *self.test.items()]
        return ", ".join(f"{name} {group.summary()}" for name, group in named if group is not None)


def fingerprint(sets: Iterable, layout: bool = False) -> str:
    """A 12-hex-digit hash of the files ``sets`` read (every path in each set's ``rows``): their paths relative
    to the folder they share, their sizes and modification times (whole seconds). Images added,
    removed, renamed or rewritten change it; moving the data set, or copying it with its times
    (``cp -p``, ``rsync -a``), does not. With ``layout`` it also covers what the split lists and
    manifests define (each set's name and ``rows``): a case moved to another group, or a mask paired
    with another image, changes it too."""
    named = [s for s in sets if s is not None]
    files = files_read(named)
    if not files:
        return "no-files"
    base = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    stats = [os.stat(f) for f in files]
    lines = [f"{os.path.relpath(f, base)}\t{st.st_size}\t{int(st.st_mtime)}" for f, st in zip(files, stats)]
    if layout:
        lines += [s.name + "".join(f"\t{_relative(field, base)}" for field in row) for s in named for row in s.rows]
    listing = "".join(line + "\n" for line in lines)
    return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:12]  # any file name


def files_read(sets: Iterable) -> list[str]:
    """Every file the ``sets`` (``None`` skipped) read: each path in each set's ``rows``, absolute, sorted."""
    rows = [row for s in sets if s is not None for row in s.rows]
    return sorted({os.path.abspath(path) for row in rows for field in row for path in _paths(field)})


def _paths(field: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A row's field (a path, several paths, or None) as a tuple of paths."""
    return (field,) if isinstance(field, str) else field or ()


def _relative(field: str | tuple[str, ...] | None, base: str) -> str:
    """A row's field as paths relative to ``base`` (``-``: None)."""
    return "-" if field is None else ";".join(os.path.relpath(os.path.abspath(path), base) for path in _paths(field))


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
    description = (f"{counted(count, unit)} of {len(items)} held out of {origin} (data.val_fraction {fraction:g}, "
                   f"seed {settings.seed})")
    return [items[i] for i in kept], [items[i] for i in held], description


class Loader:
    """Batches of dicts of a dataset in its order (``batch_size``, ``data.num_workers`` processes, no
    shuffling). Warnings raised while an item is read (a mask that is not binary) travel with its batch
    and are raised again here, in the iterating process: a worker's warnings would otherwise be lost
    with the worker, or printed by each worker apart from the one line per kind of the command line."""

    def __init__(self, dataset: Dataset, settings: Settings):
        self.batches = DataLoader(_Recorded(dataset), batch_size=settings.batch_size, collate_fn=_collate,
                                  num_workers=settings.data.num_workers, worker_init_fn=_single_thread_worker,
                                  generator=torch.Generator().manual_seed(settings.seed))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        for batch, caught in self.batches:
            for category, message in caught:
                warnings.warn(message, category, stacklevel=2)
            yield batch


class _Recorded(Dataset):
    """``dataset``'s items as ``(item, [(warning category, message), ...])``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[dict, list[tuple[type, str]]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every one goes back; the iterating process's filters decide
            item = self.dataset[index]
        return item, [(found.category, str(found.message)) for found in caught]


def _collate(samples: list[tuple[dict, list]]) -> tuple[dict, list]:
    return default_collate([item for item, _ in samples]), [found for _, caught in samples for found in caught]


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers run in parallel already; avoid oversubscribing the cores


