"""One MVTec AD category (``data.format: mvtec``; ``data.root`` is the category folder)::

    <root>/train/good/*.png   <root>/test/<defect>/*.png   <root>/ground_truth/<defect>/<name>_mask.png

Every mask must match an image and, with ``data.color: auto``, a category is all colour or all
gray (:class:`utils.data.checks.Checker`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ..config import Settings
from ..errors import DataError
from .checks import FolderLoader
from .listing import by_stem, listed, resolved, stem
from .preprocess import IMAGE_SUFFIXES
from .sets import NORMAL, ImageSet, Item, chosen_groups, hold_out


class MvtecLoader(FolderLoader):
    """One MVTec AD category: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        if not os.path.isdir(self.root):
            raise DataError(
                f"data.root {self.root} not found: for data.format mvtec it must be one MVTec AD category folder "
                f"(with train/good, test/<defect>, ground_truth/<defect>); see data/README.md"
            )

    def _images(self, folder: str) -> list[str]:
        if not os.path.isdir(folder):
            raise DataError(f"MVTec folder not found: {folder} (expected {self.root}/train/good and {self.root}/test/<defect>)")
        files = listed(folder, IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) (empty split)")
        return files

    def _good(self, name: str, *parts: str) -> ImageSet:
        folder = os.path.join(self.root, *parts, "good")
        items = [Item(path, source=folder) for path in self._images(folder)]
        return ImageSet(name, self.check.kept(folder, items), self.settings)

    def train_and_val(self, splits: Sequence[str]) -> tuple[ImageSet, Optional[ImageSet], str]:
        """``train/good``, a part of it held out as validation images."""
        kept, held, description = hold_out(self._good("train", "train").items, self.settings, "train/good")
        val = ImageSet("val", held, self.settings) if held else None
        return ImageSet("train", kept, self.settings), val, description

    def test(self) -> dict[str, ImageSet]:
        test_dir = os.path.join(self.root, "test")  # without it, test/good is named as missing
        available = {stem(folder): folder for folder in listed(test_dir, folders=True) if stem(folder) != "good"}
        defects = chosen_groups(self.settings.data.test_groups, list(available), test_dir)
        for defect in defects:
            if defect not in available:
                raise DataError(f"data.test_groups names {defect!r} but {test_dir}/{defect} does not exist; "
                                f"available defects: {', '.join(available) or 'none'}")
        test = {defect: self.defect(defect, available[defect]) for defect in defects}
        test[NORMAL] = self._good(NORMAL, "test")
        return test

    def defect(self, defect: str, folder: str) -> ImageSet:
        """``test/<defect>``, each image with its ``ground_truth/<defect>/<name>_mask.png``."""
        masks_dir = resolved(os.path.join(self.root, "ground_truth", os.path.basename(folder)))
        images = self._images(folder)
        if not os.path.isdir(masks_dir):
            raise DataError(f"defect folder {folder} has no masks: {masks_dir} not found (MVTec keeps them in ground_truth/<defect>)")
        masks = by_stem(listed(masks_dir, IMAGE_SUFFIXES))
        for name in sorted(masks.keys() - {name + "_mask" for name in by_stem(images)}):
            raise DataError(f"mask {masks[name]} matches no image in {folder} "
                            f"(expected <image name>_mask.png for an image <image name>.png there)")
        for image in images:
            if stem(image) + "_mask" not in masks:
                raise DataError(f"no ground-truth mask for {image}: expected {os.path.join(masks_dir, stem(image))}_mask.png")
        items = [Item(image, (masks[stem(image) + "_mask"],), None, image) for image in images]
        return ImageSet(defect, self.check.kept(folder, items), self.settings, anomalous=True)
