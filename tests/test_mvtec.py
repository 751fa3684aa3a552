"""MVTec AD layout on the synthetic category of :mod:`utils.data.demo.mvtec`: colour matters (a
defect of equal luminance and other hue is found in RGB, not in gray), each bad input of the
layout is one clear error, and the held-out validation images are seeded and disjoint."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import one_line_data_error
from utils.config import settings_from_dict
from utils.data import NORMAL, Loader, load_data
from utils.data.demo.mvtec import equal_luma_colour, generate_mvtec


def mvtec_settings(root, **data):
    return settings_from_dict({
        "image_size": 64, "output_dimension": 100, "blur_sigma": 2.0, "batch_size": 16, "device": "cpu",
        "data": {"format": "mvtec", "root": str(root), **data},
    })


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return generate_mvtec(str(tmp_path_factory.mktemp("mvtec") / "disc"), seed=0, size=64, n_train=20, n_good=4, n_per_defect=6)


@pytest.fixture
def small(tmp_path):
    return generate_mvtec(str(tmp_path / "small"), seed=1, size=32, n_train=4, n_good=2, n_per_defect=2)


def _color_pixel_auroc(root, color) -> float:
    from utils.padim.model import Padim

    settings = mvtec_settings(root, color=color, test_groups=["color"], val_fraction=0)
    bundle = load_data(settings, ("train", "test"))
    model = Padim(settings).fit(Loader(bundle.train, settings))
    group = bundle.test["color"]
    maps = model.score(Loader(group, settings), progress=False).maps
    masks = np.stack([group[i]["mask"].numpy() for i in range(len(group))])
    return roc_auc_score(masks.ravel(), maps.ravel())


def test_colour_defect_of_equal_luminance_is_found_in_rgb_not_in_gray(category):
    rgb, gray = _color_pixel_auroc(category, "rgb"), _color_pixel_auroc(category, "gray")
    print(f"color defect pixel AUROC: rgb {rgb:.3f}, gray {gray:.3f}")
    assert rgb > 0.9
    assert gray < 0.75


def test_the_colour_defect_is_invisible_in_pillows_luminance(category):
    """The premise of the test above, checked on the written files with Pillow's own conversion."""
    image = Image.open(os.path.join(category, "test", "color", "000.png"))
    mask = np.asarray(Image.open(os.path.join(category, "ground_truth", "color", "000_mask.png"))) > 0
    rgb = np.asarray(image).astype(float)
    gray = np.asarray(image.convert("L")).astype(float)
    outside = ~mask & (np.abs(rgb[..., 0] - rgb[..., 2]) > 60)  # the red disc around the patch
    assert abs(gray[mask].mean() - gray[outside].mean()) < 0.05 * gray[outside].mean()
    assert rgb[mask][:, 2].mean() > rgb[outside][:, 2].mean() + 100  # blue where it was red
    colour = equal_luma_colour(np.array([200.0, 60.0, 50.0]))
    assert abs(colour @ [0.299, 0.587, 0.114] - 200 * 0.299 - 60 * 0.587 - 50 * 0.114) < 1e-9


def test_generation_is_deterministic_and_leaves_no_temporary_folder(tmp_path):
    a = generate_mvtec(str(tmp_path / "a"), seed=3, size=32, n_train=2, n_good=1, n_per_defect=1)
    b = generate_mvtec(str(tmp_path / "b"), seed=3, size=32, n_train=2, n_good=1, n_per_defect=1)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs if f.endswith(".png"))
    assert len(files) == 2 + 1 + 2 * 2 * 1
    for name in files:
        assert np.array_equal(np.asarray(Image.open(os.path.join(a, name))), np.asarray(Image.open(os.path.join(b, name))))
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    with pytest.raises(OSError):
        generate_mvtec(a, seed=3, size=32, n_train=1, n_good=1, n_per_defect=1)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_the_synthetic_category_loads_with_its_masks(category):
    bundle = load_data(mvtec_settings(category))
    assert list(bundle.test) == ["color", "scratch", NORMAL]
    assert len(bundle.train) + len(bundle.val) == 20 and len(bundle.val) == 2
    item = bundle.test["color"][0]
    assert item["display"].shape == (64, 64, 3) and item["mask"].any()


# ---------------------------------------------------------------------------- bad inputs
def test_defect_folder_without_masks(small):
    shutil.rmtree(os.path.join(small, "ground_truth", "scratch"))
    message = one_line_data_error(mvtec_settings(small))
    assert os.path.join(small, "test", "scratch") in message and os.path.join("ground_truth", "scratch") in message


def test_mask_of_another_size(small):
    path = os.path.join(small, "ground_truth", "color", "001_mask.png")
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(path)
    message = one_line_data_error(mvtec_settings(small))
    assert path in message and "32x30" in message and "32x32" in message


def test_mask_name_that_matches_no_image(small):
    stray = os.path.join(small, "ground_truth", "color", "007_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(stray)
    message = one_line_data_error(mvtec_settings(small))
    assert stray in message and "matches no image" in message


def test_image_without_its_mask(small):
    os.remove(os.path.join(small, "ground_truth", "color", "001_mask.png"))
    message = one_line_data_error(mvtec_settings(small))
    assert os.path.join(small, "test", "color", "001.png") in message and "001_mask.png" in message


def test_empty_defect_folder(small):
    folder = os.path.join(small, "test", "dent")
    os.makedirs(folder)
    os.makedirs(os.path.join(small, "ground_truth", "dent"))
    message = one_line_data_error(mvtec_settings(small))
    assert folder in message and "no images" in message


def test_mixed_colour_and_gray_files(small):
    gray = os.path.join(small, "train", "good", "002.png")
    Image.open(gray).convert("L").save(gray)
    message = one_line_data_error(mvtec_settings(small))
    assert gray in message and "data.color: gray or rgb" in message
    test_gray = os.path.join(small, "test", "good", "000.png")
    Image.open(test_gray).convert("L").save(test_gray)
    assert test_gray in one_line_data_error(mvtec_settings(small), ("test",))  # the test images alone, too
    for color in ("gray", "rgb"):  # either setting reads them alike
        bundle = load_data(mvtec_settings(small, color=color), ("train",))
        shapes = {bundle.train[i]["display"].shape for i in range(len(bundle.train))}
        assert shapes == {(64, 64)} if color == "gray" else shapes == {(64, 64, 3)}


# ---------------------------------------------------------------------------- held-out validation
def test_val_fraction_is_seeded_disjoint_and_sized(category):
    def split(seed, fraction=0.25):
        bundle = load_data(mvtec_settings(category, val_fraction=fraction).replace(seed=seed), ("train", "val"))
        return bundle.train.paths, bundle.val.paths, bundle.val_description

    train, val, description = split(0)
    good = sorted(os.path.join(category, "train", "good", f) for f in os.listdir(os.path.join(category, "train", "good")))
    assert len(val) == 5 and len(train) == 15 and sorted(train + val) == good and not set(train) & set(val)
    assert split(0) == (train, val, description)
    assert split(1)[1] != val
    assert "train/good" in description and "seed 0" in description and "5 images" in description
    none = load_data(mvtec_settings(category, val_fraction=0), ("train", "val"))
    assert none.val is None and len(none.train) == 20 and "val_fraction is 0" in none.val_description


def test_a_defect_whose_masks_are_all_empty_is_named_in_a_warning(small):
    """It is scored as an image-level group; the other groups, the normal one included, give no warning."""
    from utils.evaluation.images import score_group
    from utils.padim.model import Padim

    for mask in os.listdir(os.path.join(small, "ground_truth", "scratch")):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(os.path.join(small, "ground_truth", "scratch", mask))
    settings = mvtec_settings(small, val_fraction=0)
    bundle = load_data(settings, ("train", "test"))
    model = Padim(settings).fit(Loader(bundle.train, settings), progress=False)
    with pytest.warns(UserWarning, match="test group scratch: every one of its masks is empty") as caught:
        for group in bundle.test.values():
            score_group(model, group, settings)
    assert len(caught) == 1
