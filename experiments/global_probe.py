"""Probe for docs/quality.md (issue 25, quality round 3): image scores for *global* findings.

The field's `global` slices (diffuse pathology, whole-image artefacts) have no boxes; they are
judged by image AUROC against the normal test slices. No validation slice has such a finding, so
the selection signal is synthetic, on the normal validation slices only: each slice is changed as
a whole, seeded, in one of these ways, and its image score is compared with the clean slices':

- ``noise``: Gaussian noise, standard deviation 6 % of the image's range;
- ``ghost``: a quarter-intensity copy shifted by a quarter of the field of view (motion ghosting);
- ``blur``: a Gaussian blur of 1.5 px (motion blur);
- ``bias``: a smooth multiplicative field of +-25 % (coil shading).

The scores are those of experiments/image_score_probe.py (map maximum, top-k means, a Gaussian on
pooled features, and maximum + Gaussian). The test groups ``global``, ``global_pathology`` and
``global_artefact`` are printed beside them for the record, never used to choose.

    python experiments/global_probe.py configs/fast_ixi_field.yaml

Prints one line per score; writes nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

from experiments.common import as_batches, fitted_run, probe_arguments, stacked  # noqa: E402
from experiments.image_score_probe import Scorer, loaded  # noqa: E402
from experiments.synthetic_val import SEED, brain_file  # noqa: E402
from utils.config import Settings, load_config  # noqa: E402
from utils.data import NORMAL, Loader, load_data, prepare  # noqa: E402
from utils.data.preprocess import read_image, read_mask, resize_mask  # noqa: E402
from utils.evaluation import metrics as M  # noqa: E402

GLOBAL_GROUPS = ("global", "global_pathology", "global_artefact")


def _bias(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(gray.shape), sigma=max(gray.shape) / 6)
    return gray * (1 + 0.25 * field / np.abs(field).max())


CHANGES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise": lambda gray, rng: gray + rng.normal(0, 0.06 * np.ptp(gray), gray.shape),
    "ghost": lambda gray, rng: gray + 0.25 * np.roll(gray, gray.shape[0] // 4, axis=0),
    "blur": lambda gray, rng: ndimage.gaussian_filter(gray, 1.5),
    "bias": _bias,
}


def changed_sets(settings: Settings) -> tuple[list[dict], dict[str, list[dict]], np.ndarray]:
    """The clean validation slices and, per change, the changed ones (as model input), and the brains."""
    val = load_data(settings, ("val",)).val
    rng = np.random.default_rng(SEED)
    grays = [read_image(item.image, "gray").astype(np.float64) for item in val.items]
    brains = np.stack([resize_mask(read_mask(brain_file(item)), settings).numpy() for item in val.items])
    sets = {}
    for name, change in CHANGES.items():
        changed = [np.clip(change(gray, rng), 0, gray.max()).astype(np.float32) for gray in grays]
        sets[name] = as_batches(*stacked([prepare(gray, settings) for gray in changed]), settings.batch_size)
    clean = as_batches(*stacked([prepare(gray.astype(np.float32), settings) for gray in grays]), settings.batch_size)
    return clean, sets, brains


def main(argv: Optional[list[str]] = None) -> None:
    arguments = probe_arguments(__file__, __doc__, argv)
    run = fitted_run(load_config(arguments.config))
    model, settings = run.model, run.settings
    scorer = Scorer(model, list(Loader(run.bundle.train, settings)))
    clean, changed, brains = changed_sets(settings)
    clean_scores = scorer.all(clean, model.score(clean, progress=False).maps, brains)
    val = {name: scorer.all(batches, model.score(batches, progress=False).maps, brains) for name, batches in changed.items()}
    run.score(progress=False)
    groups = run.units.groups
    test = {name: scorer.all(loaded(groups[name].paths, settings), groups[name].maps, groups[name].heads)
            for name in (NORMAL, *GLOBAL_GROUPS) if name in groups}
    for key in clean_scores:
        per_change = {name: M.image_auroc(scores[key], clean_scores[key]) for name, scores in val.items()}
        tested = {name: M.image_auroc(test[name][key], test[NORMAL][key]) for name in GLOBAL_GROUPS if name in test}
        print(f"{key}\tval " + " ".join(f"{name} {value:.3f}" for name, value in per_change.items())
              + f" mean {np.mean(list(per_change.values())):.3f}\ttest " + " ".join(f"{n} {v:.3f}" for n, v in tested.items()),
              flush=True)


if __name__ == "__main__":
    main()
