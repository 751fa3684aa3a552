"""Selection signal for docs/quality.md that never touches a test split.

Fits PaDiM as a config says, then inserts synthetic lesions (soft irregular blobs, brighter or
darker than the brain, utils.demo_data._blob) into the normal *validation* slices
(``data.val_split``, 15 fastMRI images) inside their brain masks, three lesion draws per image
(seeded), and reports on those: pixel AUROC / AP over the whole image (like protocol A),
pixel AUROC inside the brain (like B), and image AUROC of the lesioned slices against the clean
ones (like C, image score of the config, inside the brain).

    python docs/synthetic_val.py [--draws N] configs/fast_ixi.yaml [more configs ...]

``--draws`` lesions per validation slice (default 3; docs/quality.md also uses 10). Prints one
line per config; writes nothing.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scipy import ndimage  # noqa: E402

from utils.evaluation import metrics as M  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.data import load_data, make_loader  # noqa: E402
from utils.demo_data import _blob  # noqa: E402
from utils.evaluation import BRAIN_MAP_SUFFIX  # noqa: E402
from utils.padim.model import Padim  # noqa: E402
from utils.data.preprocess import prepare, read_image, read_mask, resize_mask  # noqa: E402
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
    blob = _blob(rng, gray.shape, centre, radius, irregularity=0.15, softness=0.05 * radius)
    reference = float(np.median(gray[brain]))
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.45)
    texture = ndimage.gaussian_filter(rng.normal(0, 0.04, gray.shape), 1.5)
    target = np.clip(reference * (1 + contrast) + texture, 0, 1)
    image = (gray * (1 - blob) + target * blob).astype(np.float32)
    return image, blob > 0.5


def synthetic_set(settings, draws: int = DRAWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and lesioned validation images, lesion masks and brain masks (all at image size)."""
    val = load_data(settings, ("val",)).val
    rng = np.random.default_rng(SEED)
    clean, sick, masks, brains_clean, brains_sick = [], [], [], [], []
    for path in val.paths:
        gray = read_image(path, "gray")
        brain = read_mask(os.path.splitext(path)[0] + BRAIN_MAP_SUFFIX)
        clean.append(prepare(gray, settings)[0])
        brains_clean.append(resize_mask(brain, settings))
        for _ in range(draws):
            image, mask = lesioned(gray, brain, rng)
            sick.append(prepare(image, settings)[0])
            masks.append(resize_mask(mask, settings))
            brains_sick.append(resize_mask(brain, settings))
    return torch.stack(clean), torch.stack(sick), torch.stack(masks), torch.stack(brains_clean), torch.stack(brains_sick)


def validation_metrics(model: Padim, settings, draws: int = DRAWS) -> dict[str, float]:
    """The four validation numbers of a fitted ``model`` on the synthetic-lesion set."""
    clean, sick, masks, brain_clean, brain_sick = synthetic_set(settings, draws)
    sick_maps = model.score(sick, progress=False).maps
    clean_maps = model.score(clean, progress=False).maps
    m, b = masks.numpy(), brain_sick.numpy()
    a_auroc, a_ap = M.pixel_metrics(sick_maps, m)
    s_sick = image_scores(torch.from_numpy(sick_maps), settings.image_score, brain_sick | masks).numpy()
    s_clean = image_scores(torch.from_numpy(clean_maps), settings.image_score, brain_clean).numpy()
    return {"A_auroc": a_auroc, "A_ap": a_ap, "B_auroc": M.pixel_metrics(sick_maps, m, b | m)[0],
            "C_auroc": M.image_auroc(s_sick, s_clean), "lesioned": len(sick), "clean": len(clean)}


def evaluate(config: str, draws: int = DRAWS) -> str:
    started = time.perf_counter()
    settings = load_config(config)
    train = load_data(settings, ("train",)).train
    model = Padim(settings).fit(make_loader(train, settings), progress=False)
    v = validation_metrics(model, settings, draws)
    return (f"{os.path.basename(config)}\tval-synthetic A_auroc {v['A_auroc']:.3f} A_ap {v['A_ap']:.3f} "
            f"B_auroc {v['B_auroc']:.3f} C_auroc {v['C_auroc']:.3f}\t({v['lesioned']} lesioned / {v['clean']} clean, "
            f"{time.perf_counter() - started:.0f} s)")


def draws_and_arguments(arguments: list[str], default: int = DRAWS) -> tuple[int, list[str]]:
    """``[--draws N] rest...`` -> ``(N or default, rest)``: the probes' shared command line."""
    if arguments[:1] == ["--draws"]:
        return int(arguments[1]), arguments[2:]
    return default, arguments


if __name__ == "__main__":
    draws, arguments = draws_and_arguments(sys.argv[1:])
    for path in arguments:
        print(evaluate(path, draws), flush=True)
