"""The reference study's layout (also the demo set's): split CSVs under ``<root>/data/splits``.

``data.format: study`` or ``demo``; ``data.root`` is the folder holding ``data/``::

    <root>/data/splits/<split>.csv           column ``filename``, paths like ./data/IXI/x.png,
                                             relative to <root>
    <root>/data/splits/P.csv, P_ann.csv, P_neg.csv   a pathology group, aligned row by row:
                                             image, anomaly box mask, head-minus-boxes mask
    <root>/data/splits/normal_test.csv, normal_test_ann.csv   normal test images, head masks

Every file a split names is checked when the set is loaded (:class:`utils.data.checks.Checker`),
so problems surface at once as one-line :class:`~utils.errors.DataError` messages naming the CSV
line or file, not mid-run.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Sequence

from ..config import Settings
from ..errors import DataError
from .checks import FolderLoader
from .listing import listed, nfc, read_table, resolved, stem
from .sets import NORMAL, ImageSet, Item, chosen_groups, counted, hold_out

#: Study CSVs with ``P_ann.csv`` or ``P_neg.csv`` that are not pathology groups unless ``data.test_groups`` names them.
EXCLUDED_GROUPS = ("mass_all", "local")
#: The split of the normal test images (with ``normal_test_ann.csv``, their head masks): never a pathology group.
NORMAL_TEST = "normal_test"
#: A fastMRI slice ``x.png`` has its brain mask beside it as ``x_brain_map_full.png``.
BRAIN_MAP_SUFFIX = "_brain_map_full.png"
STUDY_DOWNLOAD_HINT = (
    "download the study's data.zip from its release page and unzip it so that {root}/data/IXI, "
    "{root}/data/fastMRI and {root}/data/splits exist, or set data.format: demo (see data/README.md)"
)


class StudyLoader(FolderLoader):
    """The reference study's layout (also the demo set's): split CSVs under ``<root>/data/splits``."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        root = self.root
        self.split_dir = os.path.join(root, "data", "splits")
        if not os.path.isdir(root):
            raise DataError(f"data.root {root} not found: " + STUDY_DOWNLOAD_HINT.format(root=root))
        if not os.path.isdir(self.split_dir):
            if os.path.isdir(os.path.join(root, "splits")):
                parent = os.path.dirname(os.path.normpath(root)) or "."
                raise DataError(f"data.root {root} is the data/ folder itself; set data.root to its parent, {parent}")
            raise DataError(f"data.root {root} has no data/splits folder: " + STUDY_DOWNLOAD_HINT.format(root=root))
        #: The split CSVs by name (``mass`` for ``mass.csv``).
        self.csvs = {nfc(os.path.basename(path)[:-4]): path for path in listed(self.split_dir, (".csv",))}

    def _named_groups(self) -> list[str]:
        """Names P with P_ann.csv or P_neg.csv: a pathology group, complete or not; not a split's (normal_test,
        the training and validation splits: masks of their images)."""
        d = self.settings.data
        splits = {NORMAL_TEST, *d.train_splits, *([d.val_split] if d.val_split else [])}
        return sorted({name[:-4] for name in self.csvs if name.endswith(("_ann", "_neg"))} - splits)

    def read_csv(self, name: str) -> list[Item]:
        """Rows of ``<name>.csv`` (header ``filename``; paths relative to ``data.root``) as items (resolved
        path, source "name.csv line N"); errors on a missing, unreadable or empty CSV."""
        if nfc(name) not in self.csvs:
            raise DataError(f"split CSV not found: {os.path.join(self.split_dir, name)}.csv; "
                            f"available: {', '.join(self.csvs) or 'none'}")
        path = self.csvs[nfc(name)]
        header, rows = read_table(path, "split CSV")
        column = header[0] if header else ""
        if column.lower() not in ("filename", "filenames"):  # the study's global_artefact.csv says `filenames`
            raise DataError(f"{path}: expected a header with column `filename`, found {','.join(header)[:80]!r}")
        items = [Item(resolved(os.path.normpath(os.path.join(self.root, row[column]))), source=source)
                 for source, row in rows if row[column]]
        if not items:
            raise DataError(f"{path} lists no images (empty split)")
        return items

    def train_and_val(self, splits: Sequence[str]) -> tuple[Optional[ImageSet], Optional[ImageSet], str]:
        """The validation split ``data.val_split``, else a part of the training splits held out."""
        d = self.settings.data
        if not d.val_split:
            kept, held, description = hold_out(self.train().items, self.settings, "the training splits")
            return ImageSet("train", kept, self.settings), self.validation("val", held) if held else None, description
        train = self.train() if "train" in splits else None
        if "val" not in splits:
            return train, None, "no validation set requested"
        val = self.validation(d.val_split, self.read_csv(d.val_split))
        return train, val, f"{d.val_split} ({counted(len(val))})"

    def train(self) -> ImageSet:
        items: dict[str, Item] = {}
        for split in self.settings.data.train_splits:
            for item in self.read_csv(split):
                items.setdefault(item.image, item)
        name = "training splits " + "+".join(self.settings.data.train_splits)
        return ImageSet("train", self.check.kept(name, list(items.values())), self.settings)

    def validation(self, name: str, listed_items: Sequence[Item], anomalous: bool = False) -> ImageSet:
        """The listed images, each with its brain mask as its head where the study layout has one
        beside it (``<stem>_brain_map_full.png``), else the head estimated from the image: normal
        validation images (the region whose pixels set the threshold), or an image-level test group."""
        maps = [resolved(os.path.splitext(item.image)[0] + BRAIN_MAP_SUFFIX) for item in listed_items]
        items = [replace(item, head=(m,) if os.path.isfile(m) else None) for item, m in zip(listed_items, maps)]
        return ImageSet(name, self.check.kept(name, items), self.settings, anomalous, estimate_head=True)

    def test(self) -> dict[str, ImageSet]:
        named, requested = self._named_groups(), self.settings.data.test_groups
        available = [group for group in named if {group, group + "_ann", group + "_neg"} <= self.csvs.keys()]
        groups = chosen_groups(requested, [g for g in named if g not in EXCLUDED_GROUPS], self.split_dir)
        for group in groups:  # requested, or named by one of its CSVs: never left out without a word
            missing = [f"{n}.csv" for n in (group, group + "_ann", group + "_neg") if nfc(n) not in self.csvs]
            if missing and missing != [f"{group}_ann.csv", f"{group}_neg.csv"]:  # an image list alone is image level
                raise DataError(
                    f"test group {group!r}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing in "
                    f"{self.split_dir}; available groups: {', '.join(available) or 'none'}"
                )
        # a group listed by <group>.csv alone (no boxes, e.g. the slices with global findings) is scored for image
        # AUROC only, each image inside its brain mask where the layout has one
        test = {group: self.pathology(group) if group in available
                else self.validation(group, self.read_csv(group), anomalous=True) for group in groups}
        test[NORMAL] = self.pathology(NORMAL, anomalous=False)
        return test

    def pathology(self, group: str, anomalous: bool = True) -> ImageSet:
        """``P.csv``, ``P_ann.csv`` and ``P_neg.csv``, aligned row by row: each image with its box (the
        anomaly) and its head, box ∪ neg; for the normal test images (not ``anomalous``),
        ``normal_test.csv`` and its head masks ``normal_test_ann.csv``. A mask's name must start with its
        row's image name (rows out of order are refused). One check covers a row's image and masks, so a
        skipped image drops its masks too."""
        names = [group, group + "_ann", group + "_neg"] if anomalous else [NORMAL_TEST, NORMAL_TEST + "_ann"]
        tables = [self.read_csv(name) for name in names]
        if len({len(table) for table in tables}) > 1:
            listing = ", ".join(f"{name}.csv has {len(table)}" for name, table in zip(names, tables))
            raise DataError(f"split CSVs must align row by row but {listing} rows")
        for image, *row in zip(*tables):
            for mask in row:  # the study names a mask <image name>.png or <image name>_<what>.png
                if not (stem(mask.image) + "_").startswith(stem(image.image) + "_"):
                    raise DataError(f"{mask.source}: mask {mask.image} is not named after the image of "
                                    f"{image.source}, {image.image}: are the CSVs' rows in the same order?")
        masks = [tuple(mask.image for mask in row) for _, *row in zip(*tables)]
        items = [replace(image, anomaly=row[:1] if anomalous else (), head=row) for image, row in zip(tables[0], masks)]
        return ImageSet(group, self.check.kept(names[0], items), self.settings, anomalous=anomalous)
