"""NIfTI volumes (``data.format: nifti``): the manifest, reading and slicing, maps back in scan space.

The manifest is a CSV (``data.manifest``) with the columns ``split`` (train | val | test),
``image`` (path relative to the CSV) and optional ``label`` (the anomaly), ``brain_mask``
(the brain), ``group`` (default ``test``) and ``case`` (default: the file name without
``.nii`` / ``.nii.gz``). Label and brain mask are binary, or else thresholded at half their range
(:func:`utils.data.preprocess.binarised`). See data/README.md for examples.

Every volume goes the same way (training, validation, test and ``predict``):

1. read with nibabel; a 4-D image needs ``data.volume_index`` (the volume along the 4th axis);
2. reoriented to the closest canonical orientation (RAS+, :func:`nibabel.as_closest_canonical`),
   label and mask alike (they must have the image's shape and affine);
3. NaN voxels become 0 and count as outside the brain;
4. brain: ``brain_mask`` when given, else estimated per axial slice
   (:func:`utils.padim.foreground.foreground_mask` of the slice scaled by the volume's 99th percentile);
5. per-volume intensity normalisation inside the brain (``data.volume_intensity``: the brain's
   1st-99th percentile to [0, 1], or a z-score mapped as 0.5 + 0.15 z), clipped to [0, 1];
6. axial slices (the last axis) whose brain covers at least ``data.min_brain_fraction`` of the
   slice are kept; each is a 2-D gray array in [0, 1] through :func:`utils.data.preprocess.prepare`.

Training slices are every kept slice of the ``train`` volumes, and for a train volume with a
label only its slices whose label slice is empty. Without ``val`` volumes, a seeded
(``seed``) ``data.val_fraction`` of the *train volumes* (whole volumes, so neighbouring, nearly
identical slices never sit on both sides) is held out of the fit for the threshold and colour scale.

Scoring (:func:`score_volume`) holds one volume and its map: its kept slices go through the
model in batches, each map is put back on the slice grid (:func:`utils.data.preprocess.restore_geometry`);
slices not kept get 0; the canonical reorientation is undone, so the map has the original
image's shape and affine (:func:`write_map`).
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import torch
from nibabel.affines import obliquity
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from torch.utils.data import Dataset, default_collate

from ..config import Settings
from ..errors import DataError
from ..files import file_problem, write_atomic
from ..padim import Padim
from ..padim.foreground import foreground_mask
from .listing import has_suffix, read_table, resolved
from .preprocess import NIFTI_SUFFIXES, binarised, prepare, resize_mask, restore_geometry
from .sets import SPLITS, DataBundle, checked_groups, counted, hold_out

#: Degrees between a voxel axis and the nearest world axis above which a volume is called strongly oblique:
#: its axial slices (closest canonical orientation) cut the head at an angle other scans' slices do not.
#: A probe scored a 30-degree volume like an axis-aligned one and a 45/45-degree one at chance.
OBLIQUE_DEGREES = 30.0
REQUIRED_COLUMNS = ("split", "image")
OPTIONAL_COLUMNS = ("label", "brain_mask", "group", "case")
DEFAULT_GROUP = "test"


class ObliqueVolumeWarning(UserWarning):
    """A volume's grid is strongly oblique (:data:`OBLIQUE_DEGREES`): resample it to an axis-aligned grid first."""


# ---------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class VolumeEntry:
    """One manifest row: absolute file paths, its split, group, case name and where it was listed."""

    split: str
    image: str
    label: Optional[str]
    brain_mask: Optional[str]
    group: str
    case: str
    source: str  # "volumes.csv line 3", for messages


def case_name(path: str) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    return re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path), flags=re.IGNORECASE)


def _header(path: str, source: str) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` (header read, data not loaded), or a one-line error."""
    if problem := file_problem(path):
        raise DataError(f"{source}: file {path} {problem}")
    if not has_suffix(path, NIFTI_SUFFIXES):
        raise DataError(f"{source}: {path} is not a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several types for damaged or foreign files
        raise DataError(f"{source}: {path} is not a readable NIfTI file ({str(exc).splitlines()[0]})") from None
    if (dtype := image.get_data_dtype()).kind not in "biuf":  # RGB24 is a structured type, complex has two parts
        kind = "RGB" if dtype.fields else dtype.name
        raise DataError(f"{source}: {path} holds {kind} voxels; one real number per voxel is needed (a gray scan)")
    return image


def _check_entry(entry: VolumeEntry, volume_index: Optional[int]) -> float:
    """Headers only: the image's dimensionality and 4-D index, label and mask on the image's grid.
    Returns the image grid's obliquity in degrees (:func:`nibabel.affines.obliquity`, largest axis)."""
    image = _header(entry.image, entry.source)
    shape = image.shape
    if len(shape) == 4:
        if volume_index is None and shape[3] > 1:
            raise DataError(f"{entry.source}: {entry.image} is 4-D {shape}; set data.volume_index to the volume to use")
        if (volume_index or 0) >= shape[3]:
            raise DataError(f"{entry.source}: data.volume_index {volume_index} is out of range for {entry.image} ({shape[3]} volumes)")
    elif len(shape) != 3:
        raise DataError(f"{entry.source}: {entry.image} has shape {shape}; a 3-D (or 4-D) volume is needed")
    linear = image.affine[:3, :3]
    if not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-12:
        raise DataError(f"{entry.source}: {entry.image} has no usable affine (singular or not finite): its orientation is unknown")
    for kind, path in (("label", entry.label), ("brain_mask", entry.brain_mask)):
        if path is None:
            continue
        other = _header(path, entry.source)
        if other.shape[:3] != shape[:3] or len(other.shape) > 3 and other.shape[3] > 1:
            raise DataError(f"{entry.source}: {kind} {path} has shape {other.shape} but image {entry.image} has {shape[:3]}")
        if not np.allclose(other.affine, image.affine, atol=1e-4):
            raise DataError(f"{entry.source}: {kind} {path} has another affine than image {entry.image} (another grid)")
    return round(float(np.degrees(obliquity(image.affine)).max()), 1)


def read_manifest(sources: Sequence[str], volume_index: Optional[int] = None) -> list[VolumeEntry]:
    """The volumes ``sources`` name: every row of a manifest CSV (columns and splits checked), and a NIfTI
    file as a test volume without brain mask or label (what ``predict --input`` names: its brain is estimated
    from the image). Checked together: case names unique and plain (each names its output files), headers
    passing :func:`_check_entry`; strongly oblique volumes are named in one :class:`ObliqueVolumeWarning`."""
    entries = []
    for path in sources:
        if not has_suffix(path, (".csv",)):
            entries.append(VolumeEntry("test", path, None, None, DEFAULT_GROUP, case_name(path), "--input"))
            continue
        columns, rows = read_table(path, "manifest")
        if unknown := [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]:
            raise DataError(f"{path}: unknown column {unknown[0]!r}; allowed: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
        if missing := [c for c in REQUIRED_COLUMNS if c not in columns]:
            raise DataError(f"{path}: column {missing[0]!r} is missing (needed: split, image)")
        folder = os.path.dirname(os.path.abspath(path))
        entries += [_entry(row, folder, source) for source, row in rows]
    seen: dict[str, str] = {}
    oblique = []
    for entry in entries:
        if entry.case in (".", "..") or "/" in entry.case or "\\" in entry.case:
            raise DataError(f"{entry.source}: case name {entry.case!r} is not a plain file name (it names the output files)")
        if (key := entry.case.casefold()) in seen:  # its output files would clash where case is ignored (macOS)
            raise DataError(f"{entry.source}: case name {entry.case!r} of {entry.image} is {seen[key]}'s too (in this "
                            "or another case): set distinct `case` values in a manifest, or rename a file")
        seen[key] = entry.image
        if (degrees := _check_entry(entry, volume_index)) > OBLIQUE_DEGREES:
            oblique.append(f"{entry.image} ({degrees:.0f} degrees)")
    if oblique:
        warnings.warn(f"{counted(len(oblique), 'volume')} strongly oblique, e.g. {oblique[0]}: their axial slices cut the "
                      "head at an angle; resample them to an axis-aligned grid first (e.g. "
                      "nibabel.processing.resample_to_output)", ObliqueVolumeWarning, stacklevel=2)
    return entries


def _entry(row: dict[str, str], folder: str, source: str) -> VolumeEntry:
    def file(column: str) -> Optional[str]:
        return resolved(os.path.normpath(os.path.join(folder, row[column]))) if row.get(column) else None

    split = row.get("split", "")
    if split not in SPLITS:
        raise DataError(f"{source}: split is {split!r}; allowed: {', '.join(SPLITS)}")
    image = file("image")
    if image is None:
        raise DataError(f"{source}: the image column is empty")
    group, case = row.get("group") or DEFAULT_GROUP, row.get("case") or case_name(image)
    return VolumeEntry(split, image, file("label"), file("brain_mask"), group, case, source)


# ---------------------------------------------------------------------------- reading
@dataclass
class Volume:
    """One volume in RAS+ voxel order: ``image`` (X, Y, Z) float32 in [0, 1] (normalised),
    ``brain`` and ``label`` (X, Y, Z) bool (label all False when unknown), ``kept`` (Z,) bool
    slices, and the ``scan`` as stored (3-D; header only): the original grid's shape, affine and header."""

    entry: VolumeEntry
    image: np.ndarray
    brain: np.ndarray
    label: np.ndarray
    kept: np.ndarray
    scan: nib.Nifti1Image


def _canonical_data(path: str, source: str, volume_index: Optional[int]) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = _header(path, source)
    if len(image.shape) == 4:
        image = image.slicer[..., volume_index if volume_index is not None else 0]
    try:
        return np.asarray(nib.as_closest_canonical(image).dataobj, dtype=np.float32), image
    except MemoryError:
        raise DataError(f"{source}: {path} ({'x'.join(map(str, image.shape))} voxels) does not fit in memory") from None
    except Exception as exc:  # a truncated or damaged file fails only now, when its voxels are read
        raise DataError(f"{source}: cannot read the voxels of {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''})") from None


def _mask(path: str, source: str) -> np.ndarray:
    return binarised(_canonical_data(path, source, None)[0], path)


def estimate_brain(image: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool brain estimate: :func:`utils.padim.foreground.foreground_mask` of each axial slice
    (scaled by the volume's 99th percentile); flat slices, and slices where no foreground is found
    (the estimate is then all True), are empty."""
    scale = max(float(np.percentile(image, 99)), 1e-6)
    brain = np.zeros(image.shape, dtype=bool)
    for z in range(image.shape[2]):
        plane = np.clip(image[:, :, z] / scale, 0, 1)
        if np.ptp(plane) < 1e-3:
            continue
        mask = foreground_mask(torch.from_numpy(plane)).numpy()
        brain[:, :, z] = mask if not mask.all() else False
    return brain


def normalise_volume(image: np.ndarray, brain: np.ndarray, mode: str) -> np.ndarray:
    """Per-volume intensity to [0, 1] from the brain's voxels: ``percentile`` (1st-99th percentile
    range) or ``zscore`` (0.5 + 0.15 z), clipped."""
    values = image[brain].astype(np.float64)
    if mode == "zscore":
        scaled = 0.5 + 0.15 * (image - values.mean()) / max(values.std(), 1e-6)
    else:
        low, high = np.percentile(values, [1.0, 99.0])
        scaled = (image - low) / max(high - low, 1e-6)
    return np.clip(scaled, 0, 1).astype(np.float32)


def read_volume(entry: VolumeEntry, settings: Settings) -> Volume:
    """Read, reorient, mask and normalise one manifest entry (see the module docstring)."""
    data, original = _canonical_data(entry.image, entry.source, settings.data.volume_index)
    finite = np.isfinite(data)
    if not finite.any():
        raise DataError(f"{entry.source}: {entry.image} has no finite voxel (all NaN or Inf)")
    data = np.where(finite, data, 0).astype(np.float32)
    if np.ptp(data) == 0:
        raise DataError(f"{entry.source}: {entry.image} is constant ({float(data.flat[0])}): no contrast to fit or score")
    brain = _mask(entry.brain_mask, entry.source) if entry.brain_mask else estimate_brain(data)
    brain &= finite
    if brain.sum() < 16:
        why = f"check its brain_mask {entry.brain_mask}" if entry.brain_mask else "give one (a manifest's brain_mask)"
        broken = f", {int((~finite).sum())} of its voxels are NaN or Inf" if not finite.all() else ""
        raise DataError(f"{entry.source}: the brain of {entry.image} has {int(brain.sum())} voxels{broken}; {why}")
    label = _mask(entry.label, entry.source) if entry.label is not None else np.zeros(data.shape, bool)
    image = normalise_volume(data, brain, settings.data.volume_intensity)
    kept = brain.mean(axis=(0, 1)) >= max(settings.data.min_brain_fraction, 1e-9)
    return Volume(entry, image, brain, label, kept, original)


# ---------------------------------------------------------------------------- data sets
@dataclass(eq=False)  # compared and hashed by identity, as data sets are
class VolumeSet:
    """A test group: its manifest entries (volumes are read one at a time when scored)."""

    name: str
    entries: list[VolumeEntry]
    anomalous: bool = True

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def paths(self) -> list[str]:
        return [entry.image for entry in self.entries]

    @property
    def rows(self) -> list[tuple]:
        """Per volume: the image, its label and its brain mask (None: not given)."""
        return [(entry.image, entry.label, entry.brain_mask) for entry in self.entries]

    def summary(self) -> str:
        return counted(len(self), "volume")


class SliceSet(VolumeSet, Dataset):
    """Axial slices of volumes, as dataset items (the keys of :class:`utils.data.ImageSet` plus
    ``case`` and ``slice``): every kept slice of each volume, and of a volume with a label only
    the slices without lesion voxels. Read in order, it holds one volume at a time."""

    #: Where the slices' heads come from (see :attr:`utils.data.ImageSet.head_kinds`).
    head_kinds = {"brain mask"}

    def __init__(self, name: str, entries: Sequence[VolumeEntry], settings: Settings):
        super().__init__(name, list(entries), anomalous=False)
        self.settings = settings
        self._cached: Optional[Volume] = None
        #: (entry index, slice index) per item; reads every volume once to find its slices.
        self.index = []
        for number in range(len(self.entries)):
            volume = self._volume(number)
            self.index += [(number, int(z)) for z in np.flatnonzero(volume.kept & ~volume.label.any(axis=(0, 1)))]
        if self.entries and not self.index:
            raise DataError(f"{name}: none of its {len(self.entries)} volumes has a slice with data.min_brain_fraction "
                            f"{settings.data.min_brain_fraction} of brain (and no lesion)")

    def _volume(self, number: int) -> Volume:
        if self._cached is None or self._cached.entry is not self.entries[number]:
            self._cached = read_volume(self.entries[number], self.settings)
        return self._cached

    def summary(self) -> str:
        return f"{counted(len(self), 'slice')} of {counted(len(self.entries), 'volume')}"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        number, z = self.index[item]
        return slice_item(self._volume(number), z, self.settings) | {"index": item}


def slice_item(volume: Volume, z: int, settings: Settings) -> dict:
    """Axial slice ``z`` of ``volume`` as a dataset item; its head is the volume's brain slice
    (given or estimated once per volume, :func:`read_volume`), for the model too."""
    brain = resize_mask(volume.brain[:, :, z], settings)
    prepared = prepare(volume.image[:, :, z], settings, head=brain)
    label = resize_mask(volume.label[:, :, z], settings)
    return prepared.item(label, brain, volume.image.shape, volume.entry.image, settings, case=volume.entry.case, slice=z)


def load_volume_data(settings: Settings, splits: Sequence[str] = SPLITS) -> DataBundle:
    """The manifest's volumes as a :class:`utils.data.DataBundle`: ``train`` and ``val`` are
    :class:`SliceSet` s, ``test`` maps each group to a :class:`VolumeSet`."""
    manifest = settings.data.manifest
    entries = read_manifest([manifest], settings.data.volume_index)
    by_split = {split: [e for e in entries if e.split == split] for split in SPLITS}
    for split in ("train", "test"):
        if split in splits and not by_split[split]:
            raise DataError(f"manifest {manifest} has no {split} volumes (split column)")
    train_entries, val_entries = by_split["train"], by_split["val"]
    description = f"val volumes ({len(val_entries)})"
    if not val_entries:
        train_entries, val_entries, description = hold_out(train_entries, settings, "the train volumes", unit="volume")
    train = SliceSet("train", train_entries, settings) if "train" in splits else None
    val = SliceSet("val", val_entries, settings) if "val" in splits and val_entries else None
    test_entries = by_split["test"] if "test" in splits else []
    groups = checked_groups(list(dict.fromkeys(entry.group for entry in test_entries)), manifest)
    test = {group: VolumeSet(group, [entry for entry in test_entries if entry.group == group]) for group in groups}
    return DataBundle(train, val, test, description)


# ---------------------------------------------------------------------------- scoring
def score_volume(model: Padim, volume: Volume, settings: Settings) -> np.ndarray:
    """The (X, Y, Z) float32 anomaly map of ``volume`` in RAS+ order: kept slices scored in
    batches of ``batch_size`` and put back on the slice grid; slices not kept are 0."""
    anomaly = np.zeros(volume.image.shape, dtype=np.float32)
    slices = np.flatnonzero(volume.kept)
    for start in range(0, len(slices), settings.batch_size):
        chosen = slices[start : start + settings.batch_size]
        batch = default_collate([slice_item(volume, int(z), settings) for z in chosen])
        maps = model.score([batch], progress=False, region=batch["head"]).maps
        anomaly[:, :, chosen] = np.moveaxis(restore_geometry(maps, volume.image.shape[:2], settings), 0, -1)
    return anomaly


def write_map(anomaly: np.ndarray, volume: Volume, path: str) -> str:
    """Write a RAS+ map as gzip-compressed float32 NIfTI (``.nii.gz``) with the original image's
    shape and affine, atomically.

    The map goes back to the original voxel order (undoing :func:`nibabel.as_closest_canonical`):
    ``io_orientation(affine)`` takes the stored axes to RAS+; its inverse is the transform from RAS+
    to the stored orientation (for cyclic axis orders such as PIR the two differ)."""
    to_stored = ornt_transform(axcodes2ornt("RAS"), io_orientation(volume.scan.affine))
    data = apply_orientation(anomaly, to_stored).astype(np.float32)
    # the scan's own class (NIfTI-1 or -2) and header: its qform/sform codes are kept
    image = type(volume.scan)(data, volume.scan.affine, header=volume.scan.header)
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(1.0, 0.0)
    return write_atomic(path, gzip.compress(image.to_bytes(), mtime=0))
