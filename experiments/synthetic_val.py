"""Selection signal for docs/quality.md that never touches a test split.

Fits PaDiM as a config says, then inserts synthetic lesions (soft irregular blobs, brighter or
darker than the brain, :func:`utils.data.demo.brains.soft_blob`, the demo set's lesion) into the normal *validation* slices
(``data.val_split``, 15 fastMRI images) inside their brain masks, three lesion draws per image
(seeded), and reports on those: pixel AUROC / AP over the whole image (like protocol A),
pixel AUROC inside the brain (like B), and image AUROC of the lesioned slices against the clean
ones (like C, image score of the config, inside the brain). Beside them, the field's per-annotation
protocol (docs/protocol.md, :mod:`utils.evaluation.protocol`): each lesion's bounding box is its
annotation, the brain minus the box its healthy region, and the threshold leaves 5 % of the clean
slices' brain pixels above it; F1 and detection rate are the means over the lesioned slices.

    python experiments/synthetic_val.py [--draws N] configs/fast_ixi.yaml [more configs ...]

``--draws`` lesions per validation slice (default 3; docs/quality.md also uses 10). Prints one
line per config; writes nothing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import as_batches, command_line, stacked  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.data import Item, Loader, load_data, prepare  # noqa: E402
from utils.data.demo.brains import soft_blob  # noqa: E402
from utils.data.preprocess import read_image, read_mask, resize_mask  # noqa: E402
from utils.evaluation import metrics as M  # noqa: E402
from utils.evaluation.protocol import group_means, healthy_threshold, row_detections  # noqa: E402
from utils.padim import Padim  # noqa: E402
from utils.padim.scoring import image_scores  # noqa: E402

DRAWS = 3
SEED = 1234


def lesioned(gray: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic lesion (radius 4-9 % of the image side) inside ``brain``."""
    side = max(gray.shape)
    radius = rng.uniform(0.04, 0.09) * side
    inside = ndimage.distance_transform_edt(brain)
    candidates = np.argwhere(inside > radius * 1.2)
    if len(candidates) == 0:
        candidates = np.argwhere(brain)
    centre = tuple(float(v) for v in candidates[rng.integers(len(candidates))])
    blob = soft_blob(rng, gray.shape, centre, radius, irregularity=0.15, softness=0.05 * radius)
    reference = float(np.median(gray[brain]))
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.45)
    texture = ndimage.gaussian_filter(rng.normal(0, 0.04, gray.shape), 1.5)
    target = np.clip(reference * (1 + contrast) + texture, 0, 1)
    image = (gray * (1 - blob) + target * blob).astype(np.float32)
    return image, blob > 0.5


@dataclass
class SyntheticSet:
    """The validation slices, clean and lesioned (``draws`` per slice), at the network's size:
    network inputs, the data path's head estimates (None when the settings use none), brain masks
    and the lesions' masks."""

    clean: torch.Tensor
    clean_heads: Optional[torch.Tensor]
    brain_clean: torch.Tensor
    sick: torch.Tensor
    sick_heads: Optional[torch.Tensor]
    brain_sick: torch.Tensor
    masks: torch.Tensor

    def batches(self, lesioned: bool, batch_size: int) -> list[dict]:
        """The lesioned (or clean) slices as model input."""
        if lesioned:
            return as_batches(self.sick, self.sick_heads, batch_size)
        return as_batches(self.clean, self.clean_heads, batch_size)


def brain_file(item: Item) -> str:
    """The brain mask a validation slice is listed with (the study layout's ``<stem>_brain_map_full.png``)."""
    if not item.head:
        raise SystemExit(f"synthetic lesions are placed inside the brain: {item.image} has no brain mask beside it")
    return item.head[0]


def synthetic_set(settings: Settings, draws: int = DRAWS) -> SyntheticSet:
    """Clean and lesioned validation slices (seeded: the same lesions for every config)."""
    val = load_data(settings, ("val",)).val
    rng = np.random.default_rng(SEED)
    clean, sick, brains_clean, brains_sick, masks = [], [], [], [], []
    for item in val.items:
        gray = read_image(item.image, "gray")
        brain = read_mask(brain_file(item))
        clean.append(prepare(gray, settings))
        brains_clean.append(resize_mask(brain, settings))
        for _ in range(draws):
            image, mask = lesioned(gray, brain, rng)
            sick.append(prepare(image, settings))
            brains_sick.append(brains_clean[-1])
            masks.append(resize_mask(mask, settings))
    return SyntheticSet(*stacked(clean), torch.stack(brains_clean), *stacked(sick), torch.stack(brains_sick),
                        torch.stack(masks))


def lesion_metrics(sick_maps: np.ndarray, clean_maps: np.ndarray, synthetic: SyntheticSet, image_score: str) -> dict[str, float]:
    """(A) pixel AUROC / AP over the whole lesioned slices, (B) pixel AUROC inside their brains and
    (C) image AUROC of the lesioned slices against the clean ones (score inside the brain)."""
    masks, brains = synthetic.masks.numpy(), synthetic.brain_sick.numpy()
    a_auroc, a_ap = M.pixel_metrics(sick_maps, masks)
    sick_scores = image_scores(torch.from_numpy(sick_maps), image_score, synthetic.brain_sick | synthetic.masks).numpy()
    clean_scores = image_scores(torch.from_numpy(clean_maps), image_score, synthetic.brain_clean).numpy()
    return {"A_auroc": a_auroc, "A_ap": a_ap, "B_auroc": M.pixel_metrics(sick_maps, masks, brains | masks)[0],
            "C_auroc": M.image_auroc(sick_scores, clean_scores)}


def lesion_boxes(masks: np.ndarray) -> np.ndarray:
    """Each lesion's bounding box: the field annotates boxes, not outlines."""
    boxes = np.zeros(masks.shape, dtype=bool)
    for box, mask in zip(boxes, masks):
        box[ndimage.find_objects(mask.astype(np.int32))[0]] = True
    return boxes


def field_metrics(sick_maps: np.ndarray, clean_maps: np.ndarray, synthetic: SyntheticSet) -> dict[str, float]:
    """The field's F1 and detection rate, one annotation per lesioned slice, at the threshold of the
    clean slices' brain pixels (as the evaluation takes it from the normal validation slices)."""
    threshold = healthy_threshold(clean_maps, synthetic.brain_clean.numpy())
    boxes = lesion_boxes(synthetic.masks.numpy())
    detections = row_detections(sick_maps, np.arange(len(sick_maps)), boxes, boxes | synthetic.brain_sick.numpy(),
                                threshold)
    f1, detection = group_means(detections)
    return {"field_f1": f1, "field_detection": detection, "field_threshold": threshold}


def validation_metrics(model: Padim, synthetic: SyntheticSet) -> dict[str, float]:
    """The four validation numbers and the field's F1 and detection rate of a fitted ``model`` on the
    synthetic-lesion set, and its counts."""
    size = model.settings.batch_size
    sick_maps = model.score(synthetic.batches(True, size), progress=False).maps
    clean_maps = model.score(synthetic.batches(False, size), progress=False).maps
    return lesion_metrics(sick_maps, clean_maps, synthetic, model.settings.image_score) | field_metrics(
        sick_maps, clean_maps, synthetic) | {"lesioned": len(synthetic.sick), "clean": len(synthetic.clean)}


def evaluate(config: str, draws: int = DRAWS) -> dict[str, float]:
    """Fit the config on its training images; its validation numbers and the seconds it took."""
    started = time.perf_counter()
    settings = load_config(config)
    train = load_data(settings, ("train",)).train
    model = Padim(settings).fit(Loader(train, settings), progress=False)
    return validation_metrics(model, synthetic_set(settings, draws)) | {"seconds": time.perf_counter() - started}


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_line(__file__, __doc__, draws=DRAWS)
    parser.add_argument("configs", nargs="+", help="config files (YAML)")
    arguments = parser.parse_args(argv)
    for config in arguments.configs:
        v = evaluate(config, arguments.draws)
        print(f"{os.path.basename(config)}\tval-synthetic A_auroc {v['A_auroc']:.3f} A_ap {v['A_ap']:.3f} "
              f"B_auroc {v['B_auroc']:.3f} C_auroc {v['C_auroc']:.3f}\tfield F1 {v['field_f1']:.3f} "
              f"detected {v['field_detection']:.3f} th {v['field_threshold']:.4g}\t"
              f"({v['lesioned']} lesioned / {v['clean']} clean, {v['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
