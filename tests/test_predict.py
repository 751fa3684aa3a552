"""``predict`` writes each image's anomaly map as float32 on the image's own pixel grid; it scores only
the kind of input its model was fitted on, names inputs that are training files, and never loses an input."""

from __future__ import annotations

import glob
import os
import shutil
import warnings
from contextlib import nullcontext

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import smooth_textures, to_batch
from utils.config import settings_from_dict
from utils.data.demo.mvtec import generate_mvtec
from utils.data.load import TrainTestOverlapWarning
from utils.data.preprocess import prepare, read_image, restore_geometry
from utils.errors import DataError, ModelFileError
from utils.evaluation import run_fit
from utils.padim.model import Padim
from utils.predict import predict

#: (relative path, (H, W)): square, larger, and non-square both ways (padded to a square).
IMAGES = [("a.png", (32, 32)), (os.path.join("sub", "b.png"), (48, 48)), ("tall.png", (40, 24)), ("wide.png", (20, 36)),
          (os.path.join("sub", "c.jpg"), (32, 32))]


@pytest.fixture
def tiny(tmp_path):
    """(settings, model file) at 32 px with 8 channels; batch size 2, so that the 5 images span 3 batches."""
    settings = settings_from_dict({"backbone": "efficientnet_lite0", "image_size": 32, "output_dimension": 8,
                                   "device": "cpu", "batch_size": 2})
    model = Padim(settings).fit(to_batch(smooth_textures(6, 32, seed=1)), progress=False)
    return settings, model.save(tmp_path / "model.pt")


def _write_images(folder) -> list[str]:
    paths = []
    for index, (name, (h, w)) in enumerate(IMAGES):
        gray = smooth_textures(1, max(h, w), seed=10 + index)[0][:h, :w]
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((gray * 255).round().astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_each_image_gets_its_map_on_its_own_grid(tiny, tmp_path):
    settings, model_path = tiny
    paths = _write_images(tmp_path / "in")
    predict(settings, model_path, str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    model = Padim.load(model_path, settings)
    for (name, shape), path in zip(IMAGES, paths):
        written = np.load(tmp_path / "out" / (os.path.splitext(name)[0] + "_anomaly.npy"))
        assert written.shape == shape and written.dtype == np.float32 and np.isfinite(written).all()
        # The model's own path, one image at a time: score on the network grid, then back to (H, W).
        alone = model.score(prepare(read_image(path), settings).image[None], progress=False).maps[0]
        np.testing.assert_allclose(written, restore_geometry(alone, shape, settings), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [("x.png", "x.jpg"), ("X.png", "x.png")])  # case: one file on macOS or Windows
def test_two_inputs_that_would_write_the_same_map_are_refused(tiny, tmp_path, names):
    settings, model_path = tiny
    (tmp_path / "in").mkdir()
    for name in names:
        Image.fromarray(np.full((32, 32), 120, np.uint8)).save(tmp_path / "in" / name)
    clash = rf"images {min(names)} and {max(names)} would write one x_anomaly\.npy \(one name"
    with pytest.raises(DataError, match=clash):
        predict(settings, model_path, str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files", [["scan.nii.gz"], ["a.png", "scan.nii.gz"]])
def test_a_model_fitted_on_images_refuses_nifti_inputs(tiny, tmp_path, files):
    nib = pytest.importorskip("nibabel")
    settings, model_path = tiny
    (tmp_path / "in").mkdir()
    for name in files:
        if name.endswith(".png"):
            Image.fromarray(np.full((32, 32), 120, np.uint8)).save(tmp_path / "in" / name)
        else:
            volume = smooth_textures(1, 32, seed=2)[0][:, :, None].repeat(8, axis=2)
            nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(tmp_path / "in" / name))
    with pytest.raises(ModelFileError, match="was fitted on .* and cannot score NIfTI"):
        predict(settings, model_path, str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def _fitted_on_files(folder, fmt):
    """A model fitted with ``run_fit`` on files (an MVTec category, or one NIfTI volume): ``(settings, model
    path, a training file, a file of the same kind that is not one)``."""
    if fmt == "mvtec":
        root = generate_mvtec(str(folder / "cat"), size=32, n_train=4, n_good=1, n_per_defect=1)
        data = {"format": "mvtec", "root": root}
        files = [os.path.join(root, "train", "good", "002.png"), os.path.join(root, "test", "good", "000.png")]
    else:
        files = [str(folder / "train.nii.gz"), str(folder / "other.nii.gz")]
        for seed, path in enumerate(files):
            volume = 0.2 + smooth_textures(1, 32, seed=seed)[0][:, :, None].repeat(6, axis=2)
            nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), path)
        (folder / "v.csv").write_text("split,image,case\ntrain,train.nii.gz,a\n")
        data = {"format": "nifti", "manifest": str(folder / "v.csv"), "min_brain_fraction": 0.0}
    settings = settings_from_dict({"image_size": 32, "output_dimension": 8, "device": "cpu",
                                   "data": data | {"val_fraction": 0}})
    return settings, run_fit(settings, str(folder / "m.pt"), progress=False), *files


@pytest.mark.parametrize("fmt", ["mvtec", "nifti"])
@pytest.mark.parametrize("given, warns", [("the file", True), ("a copy", True), ("another file", False)])
def test_predict_names_inputs_that_are_training_files(tmp_path, fmt, given, warns):
    settings, model_path, train, other = _fitted_on_files(tmp_path, fmt)
    source = {"the file": train, "a copy": str(tmp_path / "in" / os.path.basename(train)), "another file": other}[given]
    if given == "a copy":
        os.mkdir(tmp_path / "in")
        shutil.copyfile(train, source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(settings, model_path, source, str(tmp_path / "out"), progress=False)
    named = [str(w.message) for w in caught if w.category is TrainTestOverlapWarning]
    assert named == ([f"1 input file also in the training data (the same file or the same content), e.g. {source}: "
                      "their scores measure memory, not detection"] if warns else [])


def test_a_manifest_that_lists_a_file_inside_the_output_is_refused_and_the_file_kept(tmp_path):
    settings, model_path, _, other = _fitted_on_files(tmp_path, "nifti")
    predict(settings, model_path, other, str(tmp_path / "out"), progress=False)
    earlier = sorted(os.listdir(tmp_path / "out"))
    listed = tmp_path / "out" / "other_anomaly.nii.gz"
    (tmp_path / "m.csv").write_text(f"split,image\ntest,{listed}\n")
    with pytest.raises(DataError, match=f"input {listed} is inside --output"):
        predict(settings, model_path, str(tmp_path / "m.csv"), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == earlier


@pytest.mark.parametrize("trained, given, color, refused", [
    ("colour", "gray", "auto", True), ("gray", "colour", "rgb", True), ("colour", "colour", "auto", False),
    ("colour", "gray", "gray", False),  # data.color gray reads both kinds as gray
])
def test_a_model_scores_only_the_kind_of_image_it_was_fitted_on(tmp_path, trained, given, color, refused):
    root = generate_mvtec(str(tmp_path / "cat"), size=32, n_train=4, n_good=1, n_per_defect=1)  # colour files
    for path in sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True)) if trained == "gray" else []:
        Image.open(path).convert("L").save(path)
    settings = settings_from_dict({"image_size": 32, "output_dimension": 8, "device": "cpu",
                                   "data": {"format": "mvtec", "root": root, "color": color, "val_fraction": 0}})
    model_path = run_fit(settings, str(tmp_path / "m.pt"), progress=False)
    source = tmp_path / "x.png"
    Image.open(os.path.join(root, "test", "good", "000.png")).convert("L" if given == "gray" else "RGB").save(source)
    with pytest.raises(DataError, match=f"fitted on {trained} images and cannot score") if refused else nullcontext():
        predict(settings, model_path, str(source), str(tmp_path / "out"), progress=False)
    assert (tmp_path / "out").exists() != refused
