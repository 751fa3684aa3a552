"""`python -m utils predict`: a folder of images -> heat-map PNGs and scores.csv, matching the API."""

from __future__ import annotations

import csv
import os

import numpy as np
import torch
import yaml
from PIL import Image

from conftest import smooth_textures, to_batch
from utils.cli import main
from utils.padim.model import Padim
from utils.data.preprocess import prepare, read_image


def test_predict_writes_one_heatmap_per_image_and_the_scores_of_the_model(small_settings, tmp_path, capsys):
    model = Padim(small_settings).fit(to_batch(smooth_textures(12, 64, seed=3)), progress=False)
    model_path = model.save(tmp_path / "model.pt")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(small_settings.to_dict()))

    images = smooth_textures(3, 64, seed=9)
    images[1, 20:34, 20:34] = 1.0  # a bright blob: the highest score
    folder = tmp_path / "in put" / "sub"
    folder.mkdir(parents=True)
    names = ["a.png", "b.png", "c.png"]
    for name, gray in zip(names, images):
        Image.fromarray((gray * 255).round().astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image, ignored")

    output = tmp_path / "out"
    assert main(["predict", "--config", str(config), "--model", str(model_path),
                 "--input", str(tmp_path / "in put"), "--output", str(output)]) == 0
    assert "3 images scored" in capsys.readouterr().out

    assert sorted(os.listdir(output / "sub")) == sorted(n.replace(".png", end) for n in names for end in ("_heatmap.png", "_anomaly.npy"))
    for name in names:
        with Image.open(output / "sub" / name.replace(".png", "_heatmap.png")) as png:
            assert png.format == "PNG"
    with open(output / "scores.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [os.path.join("sub", n) for n in names]

    # Independent expectation: the same files through the Python API.
    batch = torch.stack([prepare(read_image(str(folder / n)), small_settings).image for n in names])
    expected = model.score(batch, progress=False).scores
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, atol=1e-5)
    assert int(np.argmax(expected)) == 1
    assert [f for f in os.listdir(output) if f.startswith(".tmp")] == []
