"""A small NIfTI brain-MRI demo set, generated offline from the MNI152 template (3 mm).

``python -m utils.demo_data --nifti DIR [--seed N]`` or :func:`generate_nifti_demo` writes::

    DIR/volumes.csv                     the manifest (split, image, label, brain_mask, group, case)
    DIR/images/<case>.nii.gz            int16 T1-like volumes
    DIR/masks/<case>_brain.nii.gz       uint8 brain masks
    DIR/labels/<case>_label.nii.gz      uint8 lesion labels (test volumes)

Subjects are the MNI152 T1 template of the nilearn wheel (``load_mni152_template(resolution=2)``,
no network) resampled to 3 mm, with a random smooth deformation, a multiplicative bias field, a
gamma contrast change, a scanner gain and Rician-like noise. Test volumes carry one 3-D lesion of
a named kind, in T1-bright tissue on axial slices that are at least 30 % brain:
``hypointense_lesion`` (soft dark ellipsoid, like a T1 black hole), ``cyst`` (CSF-dark sharp
cavity) or ``mass`` (textured, a dark core in a brighter rim). Every second volume is stored in a non-canonical
voxel order (LIP) with an oblique (12 degree) affine, so readers must reorient. Deterministic
from the seed (bit-identical files); written into a temporary folder renamed into place.
"""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import from_matvec
from nibabel.eulerangles import euler2mat
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage

from ...files import staged_folder, write_atomic

NIFTI_KINDS = ("hypointense_lesion", "cyst", "mass")
COUNTS = {"train": 8, "val": 2, "test_per_kind": 2}
ZOOM = 2 / 3  # 2 mm template -> 3 mm
OBLIQUE_DEGREES = 12.0
CENTRAL_SLICE_FRACTION = 0.3


def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template, mask = load_mni152_template(resolution=2), load_mni152_brain_mask(resolution=2)
    image = ndimage.zoom(np.asarray(template.dataobj, dtype=np.float32), ZOOM, order=1)
    brain = ndimage.zoom(np.asarray(mask.dataobj, dtype=np.float32), ZOOM, order=1) > 0.5
    affine = template.affine @ np.diag([1 / ZOOM, 1 / ZOOM, 1 / ZOOM, 1])
    return image, brain, affine


def smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """White noise blurred by ``sigma``, scaled to a largest magnitude of 1."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / max(float(np.abs(field).max()), 1e-9)


def _subject(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A healthy subject: smooth deformation (about 2 voxels), bias field, gamma contrast."""
    grid = np.indices(image.shape, dtype=np.float32)
    coords = [g + 2.0 * smooth_field(rng, image.shape, 6.0) for g in grid]
    warped = ndimage.map_coordinates(image, coords, order=1)
    warped_brain = ndimage.map_coordinates(brain.astype(np.float32), coords, order=1) > 0.5
    bias = np.exp(0.2 * smooth_field(rng, image.shape, 12.0))
    return np.clip(warped, 0, None) ** rng.uniform(0.8, 1.25) * bias, warped_brain  # gamma contrast, bias field


def _lesion(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Add one lesion of ``kind`` well inside the brain; returns (image, label)."""
    radius = rng.uniform(4.0, 5.5)
    # well inside the brain, on axial slices that are mostly brain (so they are kept and scored)
    central = brain.mean(axis=(0, 1)) >= CENTRAL_SLICE_FRACTION
    white = image > np.percentile(image[brain], 60)  # T1-bright tissue, where dark lesions stand out
    inside = np.argwhere((ndimage.distance_transform_edt(brain) > radius + 2) & central[None, None, :] & white)
    centre = inside[rng.integers(len(inside))]
    axes = radius * rng.uniform(0.8, 1.25, size=3)
    distance = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(np.indices(image.shape), centre, axes)))
    label = (distance <= 1.0) & brain
    tissue = float(np.median(image[brain]))
    if kind == "hypointense_lesion":
        image = image * (1 - 0.6 * np.clip(1.3 - distance, 0, 1))
    elif kind == "cyst":
        image = np.where(label, 0.08 * tissue, image)
    else:  # mass: textured, a darker core in a brighter rim
        texture = 1.0 + 0.5 * smooth_field(rng, image.shape, 1.0)
        image = np.where(label, tissue * np.where(distance < 0.6, 0.5, 1.1) * texture, image)
    return image, label


def _store(array: np.ndarray, affine: np.ndarray, dtype, oblique: bool) -> bytes:
    """NIfTI bytes (gzip, no time stamp); ``oblique``: LIP voxel order and a rotated affine."""
    image = nib.Nifti1Image(array.astype(dtype), affine)
    if oblique:
        image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("LIP")))
        rotation = from_matvec(euler2mat(x=np.deg2rad(OBLIQUE_DEGREES)))  # about the left-right axis
        image = nib.Nifti1Image(np.asanyarray(image.dataobj), rotation @ image.affine)
    return gzip.compress(image.to_bytes(), mtime=0)


def _write_set(folder: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    template, template_brain, affine = _template()
    plan = [("train", "healthy")] * COUNTS["train"] + [("val", "healthy")] * COUNTS["val"]
    plan += [("test", kind) for kind in NIFTI_KINDS for _ in range(COUNTS["test_per_kind"])]
    rows = []
    for number, (split, kind) in enumerate(plan):
        case = f"{split}_{number:02d}" + ("" if kind == "healthy" else f"_{kind}")
        image, brain = _subject(rng, template, template_brain)
        image, label = _lesion(rng, image, brain, kind) if kind != "healthy" else (image, None)
        gain = rng.uniform(500, 1500)
        noisy = np.abs(image + 0.03 * rng.standard_normal(image.shape) + 0.03j * rng.standard_normal(image.shape))
        oblique = number % 2 == 1
        row = {"split": split, "image": f"images/{case}.nii.gz", "label": "", "brain_mask": f"masks/{case}_brain.nii.gz",
               "group": kind if kind != "healthy" else "", "case": case}
        write_atomic(os.path.join(folder, row["image"]), _store(gain * noisy, affine, np.int16, oblique))
        write_atomic(os.path.join(folder, row["brain_mask"]), _store(brain, affine, np.uint8, oblique))
        if label is not None:
            row["label"] = f"labels/{case}_label.nii.gz"
            write_atomic(os.path.join(folder, row["label"]), _store(label, affine, np.uint8, oblique))
        rows.append(row)
    manifest = pd.DataFrame(rows).to_csv(index=False, lineterminator="\n")
    write_atomic(os.path.join(folder, "volumes.csv"), manifest.encode())
    write_atomic(os.path.join(folder, "demo.json"), json.dumps({"seed": seed}).encode())  # checked by ensure_demo


def generate_nifti_demo(root: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> str:
    """Write the NIfTI demo set to ``root`` (absent or empty, or with ``overwrite`` a set generated there that
    holds nothing else: :func:`utils.files.staged_folder`, so an interrupted run leaves no partial set);
    returns ``root``."""
    with staged_folder(root, "demo_data", replace=overwrite) as folder:
        _write_set(folder, seed)
    return os.path.abspath(root)
