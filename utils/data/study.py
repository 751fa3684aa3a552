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

import csv
import os
from typing import Sequence

from ..config import Settings
from ..errors import DataError
from ..files import file_problem
from .checks import Checker, usable
from .sets import NORMAL, DataBundle, ImageSet, Item, checked_groups, counted, hold_out_images

#: Study CSVs with ``P_ann.csv`` that are not pathology groups unless ``data.test_groups`` names them.
EXCLUDED_GROUPS = ("mass_all", "local")
#: A fastMRI slice ``x.png`` has its brain mask beside it as ``x_brain_map_full.png``.
BRAIN_MAP_SUFFIX = "_brain_map_full.png"
STUDY_DOWNLOAD_HINT = (
    "download the study's data.zip from its release page and unzip it so that {root}/data/IXI, "
    "{root}/data/fastMRI and {root}/data/splits exist, or set data.format: demo (see data/README.md)"
)


class StudyLoader:
    """The reference study's layout (also the demo set's): split CSVs under ``<root>/data/splits``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.data.root
        self.split_dir = os.path.join(self.root, "data", "splits")
        self.check = Checker(settings.data.skip_bad_images)
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
        """Rows of ``<name>.csv`` as (resolved path, "name.csv line N") (:func:`read_split`)."""
        path = self.csv_path(name)
        if problem := file_problem(path):
            available = sorted(f[:-4] for f in os.listdir(self.split_dir) if f.endswith(".csv") and os.path.isfile(os.path.join(self.split_dir, f)))
            raise DataError(f"split CSV {problem}: {path}; available: {', '.join(available) or 'none'}")
        return read_split(path, self.root)

    def load(self, splits: Sequence[str]) -> DataBundle:
        bundle = self._sets(splits)
        self.check.same_colour([bundle.train, bundle.val, *bundle.test.values()], self.root, self.settings.data.color)
        return bundle

    def _sets(self, splits: Sequence[str]) -> DataBundle:
        d = self.settings.data
        test = self.test() if "test" in splits else {}
        if d.val_split:
            val = self.validation(d.val_split, self.read_csv(d.val_split)) if "val" in splits else None
            train = self.train() if "train" in splits else None
            description = f"{d.val_split} ({counted(len(val))})" if val is not None else "no validation set requested"
            return DataBundle(train, val, test, description)
        if not {"train", "val"} & set(splits):
            return DataBundle(None, None, test)
        train, val, description = hold_out_images(self.train(), "the training splits", estimate_head=True)
        if val is not None:
            val = self.validation("val", [(item.image, item.source) for item in val.items])
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
        return ImageSet("train", usable("training splits " + "+".join(self.settings.data.train_splits), items), self.settings)

    def validation(self, name: str, rows: Sequence[tuple[str, str]]) -> ImageSet:
        """Normal validation images (path, source), each with its brain mask as its head where the
        study layout has one beside it (``<stem>_brain_map_full.png``), else the head estimated from
        the image: the region whose pixels set the threshold."""
        items = []
        for path, source in rows:
            brain_map = os.path.splitext(path)[0] + BRAIN_MAP_SUFFIX
            head = (brain_map,) if os.path.isfile(brain_map) else None
            if self.check.row(source, path, head or ()):
                items.append(Item(path, (), head, source))
        return ImageSet(name, usable(name, items), self.settings, estimate_head=True)

    def test(self) -> dict[str, ImageSet]:
        requested = self.settings.data.test_groups
        available = self.available_groups()
        if requested is None:
            groups = checked_groups([g for g in available if g not in EXCLUDED_GROUPS], self.split_dir)
        else:
            groups = checked_groups([g for g in dict.fromkeys(requested) if g != NORMAL], "data.test_groups")
            for group in groups:
                missing = [f"{n}.csv" for n in (group, group + "_ann", group + "_neg") if not os.path.isfile(self.csv_path(n))]
                if missing and missing != [f"{group}_ann.csv", f"{group}_neg.csv"]:  # an image list alone is image level
                    raise DataError(
                        f"data.test_groups names {group!r} but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing in {self.split_dir}; "
                        f"available groups: {', '.join(available) or 'none'}"
                    )
        test = {group: self.pathology(group) if group in available else self.image_level(group) for group in groups}
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
        return ImageSet(group, usable(group, items), self.settings, anomalous=True)

    def image_level(self, group: str) -> ImageSet:
        """A group listed by ``<group>.csv`` alone (no boxes, e.g. the slices with global findings):
        scored for image AUROC only, each image inside its brain mask where the layout has one."""
        return self.validation(group, self.read_csv(group)).as_group(anomalous=True)

    def normal_test(self) -> ImageSet:
        images, heads = self._aligned(["normal_test", "normal_test_ann"])
        items = [
            Item(image, (), (head,), source)
            for (image, source), (head, _) in zip(images, heads)
            if self.check.row(f"{source} (with normal_test_ann)", image, (head,))
        ]
        return ImageSet(NORMAL, usable("normal_test", items), self.settings)


def read_split(path: str, root: str) -> list[tuple[str, str]]:
    """Rows of a split CSV (header ``filename``; paths relative to ``root``) as (resolved path,
    "name.csv line N"); errors on an unreadable or empty CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read split CSV {path}: {exc}") from None
    first = lines[0][0].strip() if lines and lines[0] else ""
    if first.lower() not in ("filename", "filenames"):  # the study's global_artefact.csv says `filenames`
        header = ",".join(lines[0]) if lines else "(empty file)"
        raise DataError(f"{path}: expected a header with column `filename`, found {header[:80]!r}")
    label, rows = os.path.basename(path), []
    for number, line in enumerate(lines[1:], start=2):
        if line and line[0].strip():
            value = line[0].strip()
            rows.append((value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value)), f"{label} line {number}"))
    if not rows:
        raise DataError(f"{path} lists no images (empty split)")
    return rows
