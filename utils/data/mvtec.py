"""One MVTec AD category (``data.format: mvtec``; ``data.root`` is the category folder)::

    <root>/train/good/*.png   <root>/test/<defect>/*.png   <root>/ground_truth/<defect>/<name>_mask.png

Every mask must match an image and, with ``data.color: auto``, a category is all colour or all
gray (:class:`utils.data.checks.Checker`).
"""

from __future__ import annotations

import os
from typing import Sequence

from ..config import Settings
from ..errors import DataError
from .checks import Checker, usable
from .preprocess import IMAGE_SUFFIXES
from .sets import NORMAL, DataBundle, ImageSet, Item, checked_groups, hold_out_images


class MvtecLoader:
    """One MVTec AD category: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.data.root
        self.check = Checker(settings.data.skip_bad_images)
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
        train = ImageSet("train", usable(folder, items), self.settings)
        self.check.same_colour([train, *test.values()], self.root, self.settings.data.color)
        train, val, description = hold_out_images(train, "train/good", estimate_head=False)
        return DataBundle(train if "train" in splits else None, val if "val" in splits else None, test, description)

    def test(self) -> dict[str, ImageSet]:
        test_dir = os.path.join(self.root, "test")
        if not os.path.isdir(test_dir):
            raise DataError(f"MVTec folder not found: {test_dir} (expected {self.root}/test/<defect> and test/good)")
        available = sorted(d for d in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, d)) and d != "good")
        requested = self.settings.data.test_groups
        if requested is None:
            defects = checked_groups(available, test_dir)
        else:
            defects = checked_groups([g for g in dict.fromkeys(requested) if g != NORMAL], "data.test_groups")
            for defect in defects:
                if defect not in available:
                    raise DataError(
                        f"data.test_groups names {defect!r} but {test_dir}/{defect} does not exist; "
                        f"available defects: {', '.join(available) or 'none'}"
                    )
        test = {defect: self.defect(defect) for defect in defects}
        folder = os.path.join(test_dir, "good")
        items = [Item(p, (), None, folder) for p in self._images(folder) if self.check.row(folder, p, ())]
        test[NORMAL] = ImageSet(NORMAL, usable(folder, items), self.settings)
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
        return ImageSet(defect, usable(folder, items), self.settings, anomalous=True)
