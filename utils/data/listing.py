"""How every loader lists and opens its inputs (study split CSVs, MVTec folders, NIfTI manifests,
``predict``'s files and folders), so that one rule holds for all of them:

- hidden files and folders (names starting with ``.``: macOS ``._x.png``, ``.ipynb_checkpoints``;
  and a zip's ``__MACOSX``) are not inputs;
- suffixes match in any case (``SCAN.NII.GZ`` is a NIfTI file, ``X.PNG`` an image);
- names match in NFC and NFD spelling alike (macOS may store a name typed as ``é`` as ``e`` + accent),
  and two files whose names differ only so are refused, as are two of one name with other suffixes where
  a name pairs files (:func:`by_stem`); paths written on Windows (``\\``) are read as paths;
- CSV files are UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"), blank rows are
  skipped, a header repeated as a row is refused, trailing commas are harmless, an empty file or one
  separated by ``;`` is named as such, and messages name the line in the file;
- images are opened once, through one size and decoding guard (one frame per file; Pillow's warnings
  name the file); their size is the one after the turn their EXIF orientation asks for (the readers of
  :mod:`utils.data.preprocess` turn them).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import unicodedata
import warnings
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..files import file_problem, files_below, not_utf8

#: Images with more pixels than this are refused before decoding (decompression-bomb guard).
MAX_PIXELS = 64_000_000


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def stem(path: str) -> str:
    """The NFC file name of ``path`` without its suffix: ``a/x_mask.png`` -> ``x_mask``."""
    return nfc(os.path.splitext(os.path.basename(path))[0])


def by_stem(paths: list[str]) -> dict[str, str]:
    """``{stem: path}`` of ``paths``; two files of one stem (``a.png`` and ``a.tif``) are refused: either
    could be meant."""
    found: dict[str, str] = {}
    for path in paths:
        if (name := stem(path)) in found:
            raise DataError(f"{found[name]} and {path} are one name with two suffixes; keep one of them")
        found[name] = path
    return found


def has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
    """Whether ``path`` ends in one of ``suffixes`` (lower case), in any case."""
    return path.lower().endswith(suffixes)


def listed(folder: str, suffixes: tuple[str, ...] = (), folders: bool = False, recursive: bool = False) -> list[str]:
    """The visible files below ``folder`` (directly, or at any depth with ``recursive``) whose names end
    in one of ``suffixes`` (any case), or with ``folders`` its visible sub-folders; sorted by NFC name.
    Two names that are one name in two Unicode spellings are refused; sub-folders that are not read are
    named in a warning (images moved into one would be missing without a word)."""
    if not (recursive or folders) and (unread := files_below(folder, recursive=False, folders=True)):
        warnings.warn(f"{os.path.join(folder, unread[0])}{f' and {len(unread) - 1} more' if unread[1:] else ''}: "
                      f"folders in {folder} are not read, only the files directly in it", stacklevel=2)
    found = sorted((os.path.join(folder, path) for path in files_below(folder, recursive, folders)
                    if folders or has_suffix(path, suffixes)), key=nfc)
    for first, second in zip(found, found[1:]):
        if nfc(first) == nfc(second):  # two inputs that print alike and would be one row each
            raise DataError(f"{ascii(first)} and {ascii(second)} are one name in two Unicode spellings (NFC and NFD); "
                            "rename or remove one")
    return found


def resolved(path: str) -> str:
    """``path``, or the same path with each name that is not found replaced by the one in its folder
    that is equal once NFC-normalised (one file name in another Unicode spelling); Windows separators
    (``\\``, from a CSV written there) are separators."""
    if not path or os.path.lexists(path):
        return path
    if "\\" in path and os.sep == "/":
        return resolved(os.path.normpath(path.replace("\\", "/")))
    folder, name = os.path.split(path)
    folder = resolved(folder) if folder != path else folder
    with contextlib.suppress(OSError):
        for candidate in os.listdir(folder or "."):
            if nfc(candidate) == nfc(name):
                return os.path.join(folder, candidate)
    return os.path.join(folder, name)


def read_table(path: str, what: str) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """The header (stripped) and the non-blank rows of the CSV file at ``path`` (``what`` it is, for
    messages), each row as ``(source, {column: stripped value})`` with ``source`` = ``"name.csv line N"``.
    Columns without a name are dropped when they hold no value (trailing commas); a value without a
    column is refused."""
    if problem := file_problem(path):
        raise DataError(f"{what} {path} {problem}")
    name, rows = os.path.basename(path), []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            lines = ([cell.strip() for cell in row] for row in reader)
            header = _header(next((cells for cells in lines if any(cells)), []), f"{what} {path}")
            for cells in lines:
                source = f"{name} line {reader.line_num}"
                if cells == header:
                    raise DataError(f"{source}: the header row again; remove the repeated header")
                if any(cell for column, cell in itertools.zip_longest(header, cells, fillvalue="") if not column):
                    raise DataError(f"{source}: a value in a column without a name in the header; name the column "
                                    "or remove the value")
                if any(cells):
                    rows.append((source, {column: cell for column, cell in zip(header, cells) if column}))
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} {not_utf8(exc)}: is it a CSV?") from None
    except csv.Error as exc:  # a field over csv's size limit, a NUL byte
        raise DataError(f"cannot read {what} {path} line {reader.line_num}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None
    return [column for column in header if column], rows


def _header(header: list[str], where: str) -> list[str]:
    if not header:
        raise DataError(f"{where} is empty: a header row is needed")
    if len(header) == 1 and (separator := next((s for s in ";\t|" if s in header[0]), None)):
        raise DataError(f"{where}: the header {header[0]!r} is one column: are its fields separated by "
                        f"{separator!r}? save it with commas")
    return header


@contextlib.contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
    """The opened (not yet decoded) image at ``path``: the one existence, empty-file and size check.

    Every failure, there or in the caller's block, becomes one :class:`DataError` naming the file; a
    warning of Pillow's there (corrupt EXIF data) names the file too.
    """
    if problem := file_problem(path):
        raise DataError(f"image file {problem}: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise DataError(f"image {path} is {image.width}x{image.height}, larger than the {MAX_PIXELS:,} pixel limit")
                # a multi-page TIFF, an animation: which frame is the image? (a camera's MPO: the photo, then previews)
                if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
                    raise DataError(f"image {path} holds {image.n_frames} frames; one image per file is needed")
                yield image
    except DataError:
        raise
    except Exception as exc:
        unknown = isinstance(exc, UnidentifiedImageError)
        why = "not an image file, or damaged" if unknown else f"{type(exc).__name__}: {exc}"
        raise DataError(f"cannot read image {path}: {why[:200]}") from None
    for found in caught:
        warnings.warn(f"image {path}: {str(found.message).strip()}", found.category, stacklevel=3)
