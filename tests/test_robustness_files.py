"""Interruptions and reruns through the command line (issue 19): Ctrl-C or SIGTERM at any moment is
exit 130 with nothing left behind; a rerun replaces its folder as a whole; a skipped image is one line."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from test_cli_errors import cli, ctx, images, mvtec_config, predict, snapshot, truncated_jpeg  # noqa: F401 (ctx: a fixture)
from utils.data.demo.brains import DemoCounts, generate_demo

_PRELUDE = """
import os, signal, sys
sys.path.insert(0, {root!r})
def interrupt():
    os.kill(os.getpid(), {signum})
"""

_DURING_IMPORT = """
class SignalOnTorch:  # the signal arrives exactly while torch is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            interrupt()
sys.meta_path.insert(0, SignalOnTorch())
sys.argv = ["python -m utils", "fit", "--config", {config!r}, "--output", {model!r}, "--quiet"]
import runpy
runpy.run_module("utils", run_name="__main__")
"""

_DURING_FIT = """
import torch
import utils.cli as cli
import utils.padim.model_file as model_file
from utils.padim.model import Padim

class Interrupting:  # the signal arrives in the middle of the archive, as a Ctrl-C during a long write does
    def __init__(self, stream):
        self.stream, self.written = stream, 0
    def write(self, data):
        self.written += len(data)
        if self.written > 1 << 20 and self.written - len(data) <= 1 << 20:
            interrupt()
        return self.stream.write(data)
    def __getattr__(self, name):
        return getattr(self.stream, name)

if {where!r} == "write":
    real_save = torch.save
    model_file.torch.save = lambda payload, stream: real_save(payload, Interrupting(stream))
else:
    accumulate = Padim.accumulate
    def interrupted(*args, **kwargs):
        interrupt()
        return accumulate(*args, **kwargs)
    Padim.accumulate = interrupted
sys.exit(cli.main(["fit", "--config", {config!r}, "--output", {model!r}]))
"""

_DURING_DEMO = """
from PIL import Image
import utils.demo_data as demo_data
saved, real = [0], Image.Image.save
def save(self, *args, **kwargs):
    saved[0] += 1
    if saved[0] == 20:
        interrupt()
    return real(self, *args, **kwargs)
Image.Image.save = save
sys.exit(demo_data.main([{demo!r}]))
"""


@pytest.mark.parametrize("script, signum", [
    (_DURING_IMPORT, signal.SIGINT), (_DURING_IMPORT, signal.SIGTERM),
    (_DURING_FIT.replace("{where!r}", "'accumulate'"), signal.SIGINT),
    (_DURING_FIT.replace("{where!r}", "'write'"), signal.SIGINT), (_DURING_FIT.replace("{where!r}", "'write'"), signal.SIGTERM),
    (_DURING_DEMO, signal.SIGTERM),
], ids=["import-int", "import-term", "fit-int", "write-int", "write-term", "demo-term"])
def test_an_interruption_exits_130_and_leaves_nothing(ctx, tmp_path, script, signum):
    # output_dimension: all 176 channels, a model file of several MB: the write is interrupted in its middle
    config = mvtec_config(tmp_path, ctx.category, output_dimension=None)
    code = (_PRELUDE + script).format(root=ROOT, signum=int(signum), config=config, model=str(tmp_path / "m.pt"),
                                      demo=str(tmp_path / "demo"))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and "interrupted" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "enforce fail" not in done.stderr
    assert list(snapshot(tmp_path)) == ["config.yaml"]  # no model, no demo set, no hidden temporary
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # importing utils changed nothing in this process


def test_a_new_predict_replaces_the_earlier_output_as_a_whole_behind_a_link(ctx, tmp_path, capsys):
    real, link = tmp_path / "real", tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert cli(predict(ctx, images(tmp_path / "a", 3), link), capsys)[0] == 0
    code, _, out = cli(predict(ctx, os.path.join(images(tmp_path / "b"), "i00.png"), link), capsys)  # one image file
    assert code == 0 and "1 images scored" in out and link.is_symlink()
    assert sorted(os.listdir(real)) == ["i00_anomaly.npy", "i00_heatmap.png", "predict_files.json", "scores.csv"]
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


def test_each_run_folder_describes_one_run(ctx, tmp_path, capsys):
    """Changed data give another folder; a rerun replaces its folder as a whole (no stale figures)."""
    root = shutil.copytree(ctx.category, tmp_path / "cat")
    config = mvtec_config(tmp_path, root)
    results = tmp_path / "results"
    assert cli(["evaluate", "--config", config, "--no-save-model"], capsys)[0] == 0
    (first,) = os.listdir(results)
    assert os.path.isdir(results / first / "figures")
    assert cli(["evaluate", "--config", config, "--no-save-model", "--no-figures"], capsys)[0] == 0
    assert os.listdir(results) == [first]
    assert sorted(os.listdir(results / first)) == ["config.yaml", "metrics.csv", "metrics.md", "timings.json"]
    defect = sorted(d for d in os.listdir(root / "test") if d != "good")[0]
    shutil.copy(root / "test" / defect / "000.png", root / "test" / defect / "100.png")
    shutil.copy(root / "ground_truth" / defect / "000_mask.png", root / "ground_truth" / defect / "100_mask.png")
    assert cli(["evaluate", "--config", config, "--no-save-model", "--no-figures"], capsys)[0] == 0
    assert len(os.listdir(results)) == 2  # the earlier run's folder is still there, untouched
    with open(results / first / "metrics.csv", newline="") as handle:
        counts = {row["group"]: row["n_images"] for row in csv.DictReader(handle)}
    assert counts[defect] == "3"


def test_skip_bad_images_skips_a_decode_failure_with_one_warning_line(tmp_path, capsys):
    counts = DemoCounts(ixi_train=6, fastmri_train=4, val=2, per_kind=2, normal_test=2)
    root = generate_demo(str(tmp_path / "demo"), seed=0, counts=counts)
    victim = sorted((tmp_path / "demo" / "data" / "IXI").iterdir())[1]
    truncated_jpeg(victim)
    config = tmp_path / "c.yaml"
    config.write_text(f"image_size: 32\noutput_dimension: 8\ndata:\n  format: study\n  root: {root}\n  skip_bad_images: true\n")
    code, err, out = cli(["fit", "--config", str(config), "--output", str(tmp_path / "m.pt")], capsys)
    assert code == 0 and "model written" in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: skipping") and str(victim) in lines[0], err
