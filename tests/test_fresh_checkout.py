"""A fresh checkout: ``fit``, ``evaluate`` and ``predict`` with every shipped config whose data is
generated (the demo slices of config.yaml, the NIfTI demo of configs/nifti_demo.yaml, a category
written by the MVTec demo generator for configs/mvtec.yaml), each in its own copy of the tracked
files, as a new user runs them: the data are generated on first use, nothing is prepared by hand."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT


def _copy(tmp_path) -> str:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "checkout"
    for name in listed:
        if os.path.isfile(os.path.join(ROOT, name)):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), copy / name)
    return str(copy)


def _run(copy: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=copy, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": copy})
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def _small(copy: str, config: str, **changes) -> str:
    """The shipped config with its run-time batch size lowered (no number changes) and ``changes``."""
    with open(os.path.join(copy, config), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    raw.update(changes)
    path = os.path.join(copy, "small-" + os.path.basename(config))
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(raw, handle)
    return path


@pytest.mark.parametrize("config, inputs", [
    ("config.yaml", "data/demo/data/fastMRI/brain_mid_png"),
    ("configs/nifti_demo.yaml", "data/demo_nifti/images"),
    ("configs/mvtec.yaml", "data/mvtec/bottle/test/color"),
])
def test_fit_evaluate_and_predict_work_on_a_fresh_checkout(tmp_path, config, inputs):
    copy = _copy(tmp_path)
    if "mvtec" in config:  # the shipped config points at a downloaded category: the generator writes one there
        _run(copy, "utils.demo_data", "--mvtec", "data/mvtec/bottle")
    used = config if config != "config.yaml" else _small(copy, config, image_size=64)
    fitted = _run(copy, "utils", "fit", "--config", used, "--output", "model.pt", "--quiet")
    assert "model written to model.pt" in fitted
    evaluated = _run(copy, "utils", "evaluate", "--config", used, "--model", "model.pt", "--no-figures", "--quiet")
    assert "results written to results/" in evaluated
    (run,) = os.listdir(os.path.join(copy, "results"))
    assert {"metrics.csv", "metrics.md", "config.yaml", "timings.json"} <= set(os.listdir(os.path.join(copy, "results", run)))
    predicted = _run(copy, "utils", "predict", "--config", used, "--model", "model.pt", "--input", inputs, "--output", "out",
                     "--quiet")
    assert "scored" in predicted and os.listdir(os.path.join(copy, "out"))
