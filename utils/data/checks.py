"""Checks of the files a data set lists, each file once, before any image is used."""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

from ..config import Settings
from ..errors import DataError
from ..files import file_problem
from .listing import open_image
from .preprocess import holds_colour, read_image
from .sets import DataBundle, ImageSet, Item


class SkippedImageWarning(UserWarning):
    """An unreadable image (or mask) was skipped because ``data.skip_bad_images`` is true."""


class Checker:
    """Checks each file once: exists, non-empty, within the pixel limit, decodable; remembers its
    size (width, height; turned as its EXIF orientation says, as the readers of
    :mod:`utils.data.preprocess` turn it) and whether it holds colour.

    With ``skip_bad`` the pixels are decoded too (an image as the run reads it,
    :func:`~utils.data.preprocess.read_image`), so a file whose header and chunks are fine but whose
    data are not (a truncated JPEG, values past 16 bits) is skipped here, not mid-run; otherwise
    Pillow's ``verify()`` checks the structure and a decode failure later is one :class:`DataError`.
    """

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self._found: dict[str, tuple[tuple[int, int], bool] | DataError] = {}

    def size(self, path: str, source: str, image: bool = False) -> Optional[tuple[int, int]]:
        """``(width, height)`` of the ``image`` (else mask) file; ``None`` if the file is bad and may be skipped
        (a warning is issued)."""
        if path not in self._found:
            try:
                if self.skip_bad and image:
                    read_image(path)  # as the run reads it: what the reader refuses is skipped now, not mid-run
                else:
                    with open_image(path) as opened:
                        opened.load() if self.skip_bad else opened.verify()
                with open_image(path) as header:  # verify() leaves the image unusable: the header is read again
                    # getexif() of a PNG without an eXIf chunk before its pixels decodes the whole image to look
                    # behind them (rare there; the readers still turn such images): 0.5 s per 1,000 slices
                    exif = {} if header.format == "PNG" and "exif" not in header.info else header.getexif()
                    sideways = exif.get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations turned by 90 degrees
                    self._found[path] = header.size[::-1] if sideways else header.size, holds_colour(header)
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
        checked = self._colour(groups)
        colour, gray = [p for p, c in checked.items() if c], [p for p, c in checked.items() if not c]
        if color == "auto" and colour and gray:
            fewer, kind = (colour, "colour") if len(colour) <= len(gray) else (gray, "gray")
            raise DataError(
                f"{root} mixes colour and gray images ({len(colour)} colour, {len(gray)} gray; {kind}: "
                f"{', '.join(fewer[:3])}{' ...' if len(fewer) > 3 else ''}); set data.color: gray or rgb to read them alike"
            )

    def kind(self, group: Optional["ImageSet"]) -> str:
        """``colour`` or ``gray`` when every checked image of ``group`` is that kind, else "" (mixed, or none)."""
        kinds = frozenset(self._colour([group]).values())
        return {frozenset({True}): "colour", frozenset({False}): "gray"}.get(kinds, "")

    def _colour(self, groups: Sequence[Optional["ImageSet"]]) -> dict[str, bool]:
        """Whether each checked (readable) image of ``groups`` holds colour."""
        return {p: self._found[p][1] for g in groups if g is not None for p in g.paths
                if isinstance(self._found.get(p), tuple)}

    def kept(self, name: str, items: Iterable[Item]) -> list[Item]:
        """The ``items`` whose image and mask files pass the checks, each mask of its image's size;
        bad rows are skipped (skip mode) or refused. An error if no item is left."""
        kept = [item for item in items if self.row(item)]
        if not kept:
            raise DataError(f"{name}: every image was skipped as unreadable; nothing is left to load")
        return kept

    def row(self, item: Item) -> bool:
        """Whether the item's image and masks pass (False: skipped); one call per listed row."""
        size = self.size(item.image, item.source, image=True)
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


class FolderLoader:
    """What the folder formats share (:mod:`utils.data.study`, :mod:`utils.data.mvtec`): one
    :class:`Checker` for every file, and :meth:`load`, which asks the format for its ``test()`` groups
    and for ``train_and_val(splits)``: ``(train, val or None, where val came from)``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.data.root
        self.check = Checker(settings.data.skip_bad_images)

    def load(self, splits: Sequence[str]) -> DataBundle:
        """The requested ``splits``, all colour or all gray with ``data.color: auto`` (:meth:`Checker.same_colour`)."""
        test = self.test() if "test" in splits else {}
        train, val, description = None, None, "no validation set requested"
        if {"train", "val"} & set(splits):
            train, val, description = self.train_and_val(splits)
        bundle = DataBundle(train if "train" in splits else None, val if "val" in splits else None, test, description,
                            train_kind=self.check.kind(train))
        self.check.same_colour([bundle.train, bundle.val, *test.values()], self.root, self.settings.data.color)
        return bundle
