"""Probe for docs/quality.md (not a feature): make the 581 IXI training slices look like fastMRI and
train on all 711 images, then report validation (synthetic lesions: the four numbers, the field's F1 and
detection rate) and test numbers.

The study's IXI slices differ from fastMRI in framing (233 x 197 px, the head filling a different
part of the frame) and intensity (exact-zero background where fastMRI has noise, a brighter brain).
Per IXI slice, by default:

1. framing: crop/pad a square around the head (utils.padim.foreground.foreground_mask) so that the head's
   larger side takes the same fraction of the frame as the median fastMRI training slice;
2. intensity: quantile matching to the pooled intensities of the fastMRI training slices, with ties
   broken at random (seeded), so the zero background receives fastMRI's background value spread.

With ``--register``, instead (IXI moves into the fastMRI frame; validation and test slices are untouched):

1. registration: on the network's grid, a 2-D affine registration (SimpleITK, Mattes mutual information)
   to the template, the mean of the fastMRI training slices centred on their heads as the model aligns
   them, their intensities standardised as the config does;
2. intensity: quantile matching region by region, each to the pooled standardised fastMRI intensities of
   the same region: the brain (the template's: where half of the centred fastMRI brain masks agree), the
   rest of the head, the background. Matching the whole head at once would map IXI's bright white matter
   onto fastMRI's brightest pixels, its scalp fat.

The model is the chosen configuration (configs/fast_ixi.yaml) fitted on the harmonised IXI slices
plus the 130 fastMRI normals; ``--fastmri-only`` fits the same code on the 130 alone (a check that the
probe reproduces the configuration's numbers). Another config may be given (its ``ixi_normal_train``
split is harmonised). Writes nothing.

    python experiments/harmonise_probe.py [--fastmri-only | --register] [configs/fast_ixi.yaml]   # ~2-3 min on 2 cores
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import (  # noqa: E402
    FAST_IXI, as_batches, command_line, fitted_run, group_mean, group_text, stacked, validation_text)
from experiments.synthetic_val import synthetic_set, validation_metrics  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.data import load_data, prepare  # noqa: E402
from utils.data.preprocess import (Prepared, read_image, read_mask, resize_image, resize_mask,  # noqa: E402
                                   standardise_intensity)
from utils.data.study import BRAIN_MAP_SUFFIX  # noqa: E402
from utils.padim import Padim  # noqa: E402
from utils.padim.foreground import foreground_mask  # noqa: E402

try:
    import SimpleITK as sitk
except ImportError:
    sitk = None

SEED = 0
DRAWS = 10


def head_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(foreground_mask(torch.from_numpy(gray)).numpy())
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def head_fraction(gray: np.ndarray) -> float:
    """Larger side of the head box over the larger side of the image (the padded square)."""
    top, bottom, left, right = head_box(gray)
    return max(bottom - top, right - left) / max(gray.shape)


def reframe(gray: np.ndarray, fraction: float) -> np.ndarray:
    """A square crop (zero-padded where needed) around the head, its larger side = ``fraction`` of the square."""
    top, bottom, left, right = head_box(gray)
    side = int(round(max(bottom - top, right - left) / fraction))
    cy, cx = (top + bottom) // 2, (left + right) // 2
    out = np.zeros((side, side), np.float32)
    y0, x0 = cy - side // 2, cx - side // 2
    sy, sx = max(0, y0), max(0, x0)
    ey, ex = min(gray.shape[0], y0 + side), min(gray.shape[1], x0 + side)
    out[sy - y0 : ey - y0, sx - x0 : ex - x0] = gray[sy:ey, sx:ex]
    return out


def match_quantiles(gray: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quantile matching to the sorted ``reference`` intensities, ties broken at random."""
    order = np.lexsort((rng.random(gray.size), gray.ravel()))
    ranks = np.empty(gray.size)
    ranks[order] = (np.arange(gray.size) + 0.5) / gray.size
    return np.interp(ranks, (np.arange(reference.size) + 0.5) / reference.size, reference).reshape(gray.shape).astype(np.float32)


def harmonised_ixi(settings: Settings, fast_gray: list[np.ndarray]) -> list[Prepared]:
    """The IXI training slices reframed and quantile-matched to the fastMRI ones ``fast_gray``."""
    ixi = load_data(settings.replace(data={"train_splits": ["ixi_normal_train"]}), ("train",)).train.paths
    fraction = float(np.median([head_fraction(g) for g in fast_gray]))
    reference = np.sort(np.concatenate([g.ravel() for g in fast_gray]))[:: max(1, len(fast_gray))]
    rng = np.random.default_rng(SEED)
    return [prepare(match_quantiles(reframe(read_image(path, "gray"), fraction), reference, rng), settings) for path in ixi]


@dataclass
class Frame:
    """The fastMRI training slices on the network's grid, intensities standardised as the config does (so
    that the pooled intensities do not mix scanner gains), each shifted so that its head's centroid is
    the grid's centre (as ``data.align: translation`` places every slice): their mean, the pixels that at
    least half of their brain masks cover, and each region's pooled intensities, sorted."""

    template: np.ndarray
    brain: np.ndarray
    references: tuple[np.ndarray, np.ndarray, np.ndarray]


def centred(image: np.ndarray, head: np.ndarray, order: int) -> np.ndarray:
    """``image`` shifted so that the centroid of ``head`` lies at the centre of the grid."""
    shift = (np.array(image.shape) - 1) / 2 - np.array(ndimage.center_of_mass(head))
    return ndimage.shift(image.astype(np.float32), shift, order=order, mode="constant")


def regions(head: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain, the rest of the head (scalp, skull, fat) and background: tissue classes whose order of
    brightness differs between the two sources (fastMRI's scalp fat outshines its brain, IXI's does not)."""
    return brain & head, head & ~brain, ~head


def fastmri_frame(settings: Settings, items: list) -> Frame:
    """The registration target and the intensity references, from the fastMRI training ``items``."""
    grays, brains, pooled = [], [], ([], [], [])
    for item in items:
        gray = resize_image(read_image(item.image, "gray"), settings)[0].numpy()
        head = foreground_mask(torch.from_numpy(gray))
        gray = standardise_intensity(torch.from_numpy(gray), settings.data.intensity, head).numpy()
        head = head.numpy()
        brain = resize_mask(read_mask(os.path.splitext(item.image)[0] + BRAIN_MAP_SUFFIX), settings).numpy()
        gray, head, brain = centred(gray, head, 1), centred(head, head, 0) > 0.5, centred(brain, head, 0) > 0.5
        for values, region in zip(pooled, regions(head, brain)):
            values.append(gray[region])
        grays.append(gray)
        brains.append(brain)
    references = tuple(np.sort(np.concatenate(values)) for values in pooled)
    return Frame(np.mean(grays, axis=0), np.mean(brains, axis=0) >= 0.5, references)


def register(moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """``moving`` resampled onto ``fixed`` by the 2-D affine transform that maximises their mutual
    information (the two differ in contrast), coarse to fine from the alignment of their intensity moments."""
    if sitk is None:
        raise SystemExit("--register needs SimpleITK: python -m pip install SimpleITK")
    fixed_image, moving_image = (sitk.GetImageFromArray(np.asarray(a, np.float32)) for a in (fixed, moving))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(sitk.CenteredTransformInitializer(
        fixed_image, moving_image, sitk.AffineTransform(2), sitk.CenteredTransformInitializerFilter.MOMENTS))
    transform = method.Execute(fixed_image, moving_image)
    return sitk.GetArrayFromImage(sitk.Resample(moving_image, fixed_image, transform, sitk.sitkLinear, 0.0))


def match_regions(gray: np.ndarray, masks: tuple[np.ndarray, ...], references: tuple[np.ndarray, ...],
                  rng: np.random.Generator) -> np.ndarray:
    """Quantile matching of each region of ``gray`` to the sorted ``references`` of the same region."""
    out = np.zeros_like(gray)
    for mask, reference in zip(masks, references):
        if mask.any():
            out[mask] = match_quantiles(gray[mask], reference, rng)
    return out


def registered_ixi(settings: Settings, frame: Frame) -> list[Prepared]:
    """The IXI training slices registered to the fastMRI template on the network's grid, then matched
    region by region (brain = the template's, head = their own estimate) to the fastMRI intensities."""
    ixi = load_data(settings.replace(data={"train_splits": ["ixi_normal_train"]}), ("train",)).train.paths
    on_grid = settings.replace(image_size=settings.input_size, data={"center_crop": None})  # no second resize
    rng = np.random.default_rng(SEED)
    prepared = []
    for path in ixi:
        moved = register(resize_image(read_image(path, "gray"), settings)[0].numpy(), frame.template)
        masks = regions(foreground_mask(torch.from_numpy(moved)).numpy(), frame.brain)
        prepared.append(prepare(match_regions(moved, masks, frame.references, rng), on_grid))
    return prepared


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_line(__file__, __doc__)
    ixi = parser.add_mutually_exclusive_group()
    ixi.add_argument("--fastmri-only", action="store_true", help="fit on the fastMRI training slices alone")
    ixi.add_argument("--register", action="store_true",
                     help="IXI registered to the fastMRI template and matched region by region (needs SimpleITK)")
    parser.add_argument("config", nargs="?", default=FAST_IXI, help="config file (default: configs/fast_ixi.yaml)")
    arguments = parser.parse_args(argv)
    settings = load_config(arguments.config)
    items = load_data(settings, ("train",)).train.items
    fast_gray = [read_image(item.image, "gray") for item in items]
    prepared = [prepare(g, settings) for g in fast_gray]
    if arguments.register:
        prepared += registered_ixi(settings, fastmri_frame(settings, items))
    elif not arguments.fastmri_only:
        prepared += harmonised_ixi(settings, fast_gray)
    model = Padim(settings).fit(as_batches(*stacked(prepared), settings.batch_size), progress=False)
    v = validation_metrics(model, synthetic_set(settings, DRAWS))
    print(f"train {len(prepared)}: {validation_text(v)} F1 {v['field_f1']:.3f} detected {v['field_detection']:.3f}",
          flush=True)
    mean = group_mean(fitted_run(settings, model))
    print(f"train {len(prepared)}: {group_text(mean)} F1 {mean['field_f1']:.3f} detected {mean['field_detection']:.3f}")


if __name__ == "__main__":
    main()
