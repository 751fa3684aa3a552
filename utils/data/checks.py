"""Checks of the files a data set lists, each file once, before any image is used."""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

from ..errors import DataError
from ..files import file_problem
from .listing import open_image, upright_size
from .preprocess import COLOR_MODES
from .sets import ImageSet, Item


class SkippedImageWarning(UserWarning):
    """An unreadable image (or mask) was skipped because ``data.skip_bad_images`` is true."""


class Checker:
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
            try:
                with open_image(path) as image:
                    image.load() if self.skip_bad else image.verify()
                with open_image(path) as image:  # verify() leaves the image unusable: the header is read again
                    self._found[path] = upright_size(image), image.mode in COLOR_MODES
            except DataError as exc:
                self._found[path] = exc
        result = self._found[path]
        if isinstance(result, tuple):
            return result[0]
        if problem := file_problem(path):
            raise DataError(f"{source}: file {problem}: {path}")
        if self.skip_bad:
            warnings.warn(f"skipping {source}: {result} (data.skip_bad_images is true)", SkippedImageWarning, stacklevel=2)
            return None
        raise DataError(f"{source}: {result}; fix or remove it, or set data.skip_bad_images: true to skip it")

    def same_colour(self, groups: Sequence[Optional["ImageSet"]], root: str, color: str) -> None:
        """With ``data.color: auto`` every checked image of a data set must be colour, or every one
        gray (a batch cannot hold both)."""
        checked = [(p, self._found[p]) for g in groups if g is not None for p in g.paths if isinstance(self._found.get(p), tuple)]
        colour, gray = [p for p, (_, c) in checked if c], [p for p, (_, c) in checked if not c]
        if color == "auto" and colour and gray:
            fewer, kind = (colour, "colour") if len(colour) <= len(gray) else (gray, "gray")
            raise DataError(
                f"{root} mixes colour and gray images ({len(colour)} colour, {len(gray)} gray; {kind}: "
                f"{', '.join(fewer[:3])}{' ...' if len(fewer) > 3 else ''}); set data.color: gray or rgb to read them alike"
            )

    def kept(self, name: str, items: Iterable[Item]) -> list[Item]:
        """The ``items`` whose image and mask files pass the checks, each mask of its image's size;
        bad rows are skipped (skip mode) or refused. An error if no item is left."""
        kept = [item for item in items if self.row(item)]
        if not kept:
            raise DataError(f"{name}: every image was skipped as unreadable; nothing is left to load")
        return kept

    def row(self, item: Item) -> bool:
        """Whether the item's image and masks pass (False: skipped); one call per listed row."""
        size = self.size(item.image, item.source)
        if size is None:
            return False
        for mask in dict.fromkeys((*item.anomaly, *(item.head or ()))):
            mask_size = self.size(mask, item.source)
            if mask_size is None:
                return False
            if mask_size != size:
                raise DataError(f"{item.source}: mask {mask} is {mask_size[0]}x{mask_size[1]} but image {item.image} "
                                f"is {size[0]}x{size[1]}")
        return True
