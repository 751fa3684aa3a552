"""A small brain-MRI data set in the study's layout, generated offline from the MNI152 template.

``python -m utils.demo_data DIR [--seed N]`` or :func:`generate_demo` writes::

    DIR/data/IXI/*.png                          IXI-like healthy slices (197x233, zero background)
    DIR/data/fastMRI/brain_mid_png/*.png        fastMRI-like slices (320x320 or 270x320, noisy
                                                background) and their *_brain_map_full.png head masks
    DIR/data/fastMRI/brain_mid_anno_pos_png/    one box mask per lesion: <slice>_<kind>_<k>.png
    DIR/data/fastMRI/brain_mid_anno_neg_png/    head minus the slice's boxes: <slice>.png
    DIR/data/splits/*.csv                       ixi_normal_train, normal_train, normal_val,
                                                normal_test(+_ann), and <kind>/<kind>_ann/<kind>_neg
    DIR/data/demo.json                          seed, counts and generator version

so the study loader of :mod:`utils.data.study` reads it unchanged. Each "subject" is an axial slice
of the MNI152 T1 template (``nilearn.datasets.load_mni152_template``, inside the nilearn wheel,
no network) near the middle of the brain, with a synthetic skull and scalp, a random smooth
deformation (affine plus elastic), a multiplicative bias field, a gamma contrast change and
noise. The two "scanners" differ as in the study: IXI-like images have an exact-zero background
and a bright brain; fastMRI-like images are zoomed, darker, with a noisy non-zero background.

Test slices carry synthetic pathologies of three named kinds (several per slice sometimes, one
CSV row each, as in the study): ``hyperintense_lesion`` (bright, soft-edged blob),
``cyst`` (sharp, CSF-dark round cavity) and ``mass_oedema`` (textured mass that pushes the
tissue aside, ringed by hypointense oedema). Everything is deterministic from the seed
(bit-identical files), and written atomically: a temporary folder beside DIR, renamed at the end.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from ...files import staged_folder


GENERATOR_VERSION = 1
#: Lesion kinds and the range of their radius (pixels at 1 mm).
RADII = {"hyperintense_lesion": (8, 13), "cyst": (10, 15), "mass_oedema": (9, 13)}
KINDS = tuple(RADII)
#: Axial template slices (1 mm MNI152, 189 slices) used: around the lateral ventricles.
SLICE_RANGE = (80, 96)
IXI_SHAPE = (233, 197)  # rows, columns, as the study's IXI PNGs (197x233)
FASTMRI_SHAPES = ((320, 320), (320, 270))


@dataclass(frozen=True)
class DemoCounts:
    """How many images of each split the demo set holds."""

    ixi_train: int = 40
    fastmri_train: int = 20
    val: int = 10
    per_kind: int = 8
    normal_test: int = 10
    #: Probability that a pathology slice carries a second lesion (a second CSV row).
    second_lesion: float = 0.3


# ---------------------------------------------------------------------------- template
@functools.cache
def _template() -> np.ndarray:
    """The 1 mm MNI152 T1 template as ``(slices, 233, 197)`` float32 axial images in [0, 1]."""
    from nilearn.datasets import load_mni152_template  # in the wheel; no download

    volume = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    return np.ascontiguousarray(np.rot90(volume, axes=(0, 1)).transpose(2, 0, 1))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (coarse noise, blurred, upsampled: fast)."""
    step = max(1, int(sigma // 3))
    coarse = rng.normal(size=(shape[0] // step + 2, shape[1] // step + 2))
    coarse = ndimage.gaussian_filter(coarse, sigma / step, mode="reflect")
    field = ndimage.zoom(coarse, step, order=1)[: shape[0], : shape[1]]
    return ((field - field.mean()) / max(field.std(), 1e-8)).astype(np.float32)


def _subject(rng: np.random.Generator, padding: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A template slice with a synthetic skull and scalp, at 1 mm, padded.

    Returns (intensity in [0, ~1], labels: 0 background, 1 scalp/skull/CSF, 2 brain)."""
    volume = _template()
    z = rng.uniform(*SLICE_RANGE)
    low = int(z)
    t = z - low
    brain_image = (1 - t) * volume[low] + t * volume[low + 1]
    brain_image = np.pad(brain_image, padding)
    brain = ndimage.binary_fill_holes(brain_image > 0.02)
    brain = ndimage.binary_opening(brain, iterations=1)
    outside = ndimage.distance_transform_edt(~brain) + 1.2 * _smooth_noise(rng, brain.shape, 12)
    outside[brain] = 0
    edges = np.cumsum([0, rng.uniform(1.5, 3.0), rng.uniform(3.0, 5.0), rng.uniform(3.5, 6.0)])  # CSF, skull, scalp
    layer = np.digitize(outside, edges, right=True)  # 1, 2, 3 in the CSF, skull and scalp rings
    image = np.where(brain, brain_image, 0).astype(np.float32)
    image[layer == 1] = 0.12
    image[layer == 2] = 0.06
    image[layer == 3] = rng.uniform(0.8, 0.95) + 0.05 * _smooth_noise(rng, brain.shape, 3)[layer == 3]
    image = ndimage.gaussian_filter(image, 0.6)
    labels = np.where(brain, 2, outside <= edges[-1]).astype(np.uint8)
    return image, labels


def _warp(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, shape: tuple[int, int],
          zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample the padded subject onto an output canvas of ``shape``: random affine (rotation,
    anisotropic scale, shift) and smooth elastic displacement, magnified by ``zoom``."""
    out_r, out_c = np.indices(shape, dtype=np.float32)
    out_r -= (shape[0] - 1) / 2 + rng.uniform(-4, 4)
    out_c -= (shape[1] - 1) / 2 + rng.uniform(-4, 4)
    angle = np.deg2rad(rng.uniform(-7, 7))
    scale_r, scale_c = rng.uniform(0.93, 1.07, size=2) * zoom
    cos, sin = np.cos(angle), np.sin(angle)
    src_r = (cos * out_r - sin * out_c) / scale_r
    src_c = (sin * out_r + cos * out_c) / scale_c
    amplitude = rng.uniform(1.5, 3.5)
    src_r += amplitude * _smooth_noise(rng, shape, 16 * zoom)
    src_c += amplitude * _smooth_noise(rng, shape, 16 * zoom)
    centre = (np.array(image.shape, dtype=np.float32) - 1) / 2
    coords = np.stack([src_r + centre[0], src_c + centre[1]])
    return (ndimage.map_coordinates(image, coords, order=1, mode="constant").astype(np.float32),
            ndimage.map_coordinates(labels, coords, order=0, mode="constant"))


# ---------------------------------------------------------------------------- pathologies
def soft_blob(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float,
          irregularity: float, softness: float) -> np.ndarray:
    """Soft ellipse-like blob in [0, 1] with a randomly wobbling boundary."""
    dr, dc = np.indices(shape) - np.reshape(centre, (2, 1, 1))  # offsets from the centre
    angle = np.arctan2(dr, dc)
    aspect = rng.uniform(0.75, 1.25)
    tilt = rng.uniform(0, np.pi)
    rotated_r = dr * np.cos(tilt) - dc * np.sin(tilt)
    rotated_c = dr * np.sin(tilt) + dc * np.cos(tilt)
    distance = np.hypot(rotated_r * aspect, rotated_c / aspect)
    wobble = sum(irregularity * rng.normal() / k * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    edge = radius * (1 + wobble)
    return (1 / (1 + np.exp((distance - edge) / max(softness, 1e-3)))).astype(np.float32)


def _mass_effect(image: np.ndarray, labels: np.ndarray, centre: tuple[float, float], radius: float,
                 strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Push tissue radially away from ``centre`` (displacement fading with distance)."""
    rows, cols = np.indices(image.shape, dtype=np.float32)
    dr, dc = rows - centre[0], cols - centre[1]
    distance = np.hypot(dr, dc) + 1e-3
    push = strength * radius * np.exp(-((distance / (2.5 * radius)) ** 2))
    coords = np.stack([rows - push * dr / distance, cols - push * dc / distance])
    return (ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32),
            ndimage.map_coordinates(labels, coords, order=0, mode="nearest"))


def _add_lesion(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, kind: str, scale: float,
                taken: list[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Paint one lesion of ``kind`` inside the brain; returns image, labels and its box mask."""
    radius = rng.uniform(*RADII[kind]) * scale
    extent = radius * (2.0 if kind == "mass_oedema" else 1.3)
    inside = ndimage.distance_transform_edt(labels == 2)
    candidates = np.argwhere(inside > extent + 3 * scale)
    picks = candidates[rng.integers(0, len(candidates), size=min(200, len(candidates)))]
    centre = next(((float(r), float(c)) for r, c in picks  # the first one clear of the slice's other lesions
                   if all(np.hypot(r - tr, c - tc) > extent + te + 4 for tr, tc, te in taken)), None)
    if centre is None:
        return image, labels, None
    taken.append((centre[0], centre[1], extent))
    shape = image.shape
    reference = float(np.median(image[labels == 2]))
    if kind != "mass_oedema":  # a bright soft blob, or a cyst: sharp and CSF-dark
        cyst = kind == "cyst"
        footprint = soft_blob(rng, shape, centre, radius, 0.04 if cyst else 0.08, (0.4 if cyst else 1.2) * scale)
        value = rng.uniform(0.08, 0.16) if cyst else reference * rng.uniform(1.45, 1.7)
        image = image * (1 - footprint) + value * footprint
    else:
        image, labels = _mass_effect(image, labels, centre, radius, rng.uniform(0.35, 0.55))
        oedema = soft_blob(rng, shape, centre, radius * rng.uniform(1.6, 1.9), 0.15, 2.0 * scale) * (labels == 2)
        image = image * (1 - 0.45 * oedema)
        core = soft_blob(rng, shape, centre, radius, 0.1, 0.8 * scale)
        texture = 1 + 0.15 * _smooth_noise(rng, shape, 1.5 * scale)
        image = image * (1 - core) + reference * rng.uniform(0.95, 1.15) * texture * core
        footprint = np.maximum(core, oedema)
    box = np.zeros(shape, dtype=bool)
    box[ndimage.find_objects((footprint > 0.5).astype(np.uint8))[0]] = True  # the footprint's bounding box
    return image.astype(np.float32), labels, box


# ---------------------------------------------------------------------------- scanners
def _render(rng: np.random.Generator, scanner: str, lesions: Sequence[str] = ()):
    """One slice: (uint8 image, head mask, [box masks])."""
    image, labels = _subject(rng)
    ixi = scanner == "ixi"
    shape = IXI_SHAPE if ixi else FASTMRI_SHAPES[int(rng.random() < 0.25)]
    zoom = 1.0 if ixi else rng.uniform(1.15, 1.3)
    image, labels = _warp(rng, image, labels, shape, zoom)
    boxes, taken = [], []
    for kind in lesions:
        image, labels, box = _add_lesion(rng, image, labels, kind, zoom, taken)
        if box is not None:
            boxes.append(box)
    head = labels > 0
    image = np.clip(image, 0, None) ** rng.uniform(0.8, 1.25)  # contrast
    image *= np.exp(rng.uniform(0.06, 0.15) * _smooth_noise(rng, shape, 60 * zoom))  # bias field
    brain_level = rng.uniform(*((0.72, 0.82) if ixi else (0.55, 0.65)))  # IXI-like brains are brighter
    image *= brain_level / max(float(np.median(image[labels == 2])), 1e-6)
    if ixi:
        image += rng.normal(0, rng.uniform(0.008, 0.015), shape) * head
        image = np.where(head, image, 0.0)
    else:
        background = rng.uniform(0.09, 0.16)
        image = np.where(head, image, background) + rng.normal(0, rng.uniform(0.02, 0.03), shape)
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return pixels, head, boxes


# ---------------------------------------------------------------------------- writing
def _write_set(folder: str, seed: int, counts: DemoCounts) -> None:
    for sub in ("IXI", "splits", *(f"fastMRI/brain_mid_{kind}png" for kind in ("", "anno_pos_", "anno_neg_"))):
        os.makedirs(os.path.join(folder, "data", sub))
    # one independent stream per image: changing one count does not change the other images
    sequence = np.random.SeedSequence(seed)
    rngs = (np.random.default_rng(stream) for stream in iter(lambda: sequence.spawn(1)[0], None))
    stems = (f"./data/fastMRI/brain_mid_png/demo_brain_AXT1_{n:04d}" for n in itertools.count(1))

    def save(array: np.ndarray, path: str) -> str:
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        Image.fromarray(array).save(os.path.join(folder, path), optimize=False)
        return path  # as the study's CSVs list it, relative to the set's root

    def fastmri(rng: np.random.Generator, lesions: Sequence[str] = ()) -> tuple:
        """One fastMRI-like slice and its brain map written: (slice path, brain map path, head, boxes, stem)."""
        pixels, head, boxes = _render(rng, "fastmri", lesions)
        stem = next(stems)
        return save(pixels, stem + ".png"), save(head, stem + "_brain_map_full.png"), head, boxes, stem

    ixi = [save(_render(next(rngs), "ixi")[0], f"./data/IXI/sub-DEMO{i:03d}_T1w.png") for i in range(counts.ixi_train)]
    splits = {"ixi_normal_train": ixi}
    normal = {"normal_train": counts.fastmri_train, "normal_val": counts.val, "normal_test": counts.normal_test}
    for split, count in normal.items():
        written = [fastmri(next(rngs)) for _ in range(count)]
        splits[split] = [image for image, *_ in written]
    splits["normal_test_ann"] = [brain_map for _, brain_map, *_ in written]
    for kind in KINDS:
        rows = []  # one row per box, as the study's P.csv, P_ann.csv and P_neg.csv
        for _ in range(counts.per_kind):
            rng = next(rngs)
            image, _, head, boxes, stem = fastmri(rng, [kind] * (2 if rng.random() < counts.second_lesion else 1))
            annotation = stem.replace("brain_mid_png", "brain_mid_anno_pos_png")
            box_paths = [save(box, f"{annotation}_{kind}_{k}.png") for k, box in enumerate(boxes)]
            neg_path = stem.replace("brain_mid_png", "brain_mid_anno_neg_png") + ".png"
            neg = save(head & ~np.logical_or.reduce(boxes), neg_path)  # the head minus every box of the slice
            rows += [(image, box, neg) for box in box_paths]
        splits[kind], splits[kind + "_ann"], splits[kind + "_neg"] = ([row[i] for row in rows] for i in range(3))
    for name, files in splits.items():
        pd.DataFrame({"filename": files}).to_csv(os.path.join(folder, "data", "splits", name + ".csv"), index=False,
                                                 lineterminator="\n")
    manifest = {
        "generator": "utils.demo_data",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "kinds": list(KINDS),
        "counts": {name: len(files) for name, files in splits.items()},
    }
    with open(os.path.join(folder, "data", "demo.json"), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)


def generate_demo(root: str | os.PathLike, seed: int = 0, counts: DemoCounts = DemoCounts(),
                  overwrite: bool = False) -> str:
    """Write the demo set to ``root`` (absent or empty, or with ``overwrite`` a set generated there that holds
    nothing else: :func:`utils.files.staged_folder`); returns ``root``. Raises ``FileExistsError`` otherwise."""
    with staged_folder(root, "demo_data", replace=overwrite) as folder:
        _write_set(folder, seed, counts)
    return os.path.abspath(root)
