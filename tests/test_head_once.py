"""The head of an image is estimated once, in the data path, and carried to the model (alignment,
background masking) and to the evaluation (reference regions): counted over a whole run."""

import numpy as np
import pytest

from utils.config import settings_from_dict
from utils.data import preprocess, sets
from utils.data.demo.brains import DemoCounts, generate_demo
from utils.evaluation import Run
from utils.padim import foreground


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("head") / "demo"
    return generate_demo(root, counts=DemoCounts(ixi_train=4, fastmri_train=3, val=3, per_kind=2, normal_test=2))


@pytest.mark.parametrize("data, mask_background", [
    ({"intensity": "zscore", "align": "translation"}, True),  # every step that needs the head
    ({"intensity": "none", "align": "none", "val_split": None, "val_fraction": 0.3}, False),  # only the held-out reference set
])
def test_every_decoded_image_has_at_most_one_head_estimate(demo_root, tmp_path, monkeypatch, data, mask_background):
    decoded, estimated, in_model = [], [], []
    read_image, estimate = sets.read_image, preprocess.foreground_mask
    monkeypatch.setattr(sets, "read_image", lambda path, color: decoded.append(path) or read_image(path, color))
    monkeypatch.setattr(preprocess, "foreground_mask", lambda image: estimated.append(1) or estimate(image))
    monkeypatch.setattr(foreground, "foreground_mask", lambda image: in_model.append(1) or estimate(image))
    settings = settings_from_dict({"image_size": 32, "output_dimension": 8, "device": "cpu", "batch_size": 4,
                                   "mask_background": mask_background, "results_dir": str(tmp_path),
                                   "data": {"root": demo_root, **data}})
    run = Run(settings)
    run.load_data()
    run.fit(progress=False)
    run.score(progress=False)
    run.compute_metrics()
    assert in_model == []  # the model never estimates a head of its own
    if settings.estimates_head:
        assert len(estimated) == len(decoded)  # each decoded image once
    else:  # only the held-out validation images, whose region sets the threshold
        assert len(estimated) == len(run.bundle.val) > 0
    assert np.isfinite(run.table.set_index("group").loc["mean", "A_auroc"])
