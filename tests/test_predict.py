"""``predict`` writes each image's anomaly map as float32 on the image's own pixel grid."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import smooth_textures, to_batch
from utils.config import settings_from_dict
from utils.data.preprocess import prepare, read_image, restore_geometry
from utils.errors import DataError, ModelFileError
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


def test_two_inputs_that_would_write_the_same_map_are_refused(tiny, tmp_path):
    settings, model_path = tiny
    (tmp_path / "in").mkdir()
    for suffix in (".png", ".jpg"):
        Image.fromarray(np.full((32, 32), 120, np.uint8)).save(tmp_path / "in" / f"x{suffix}")
    with pytest.raises(DataError, match=r"would write the same x_anomaly\.npy \(same name, other suffix\)"):
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
