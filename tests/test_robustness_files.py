"""A hostile user's file-system states, interruptions and reruns (issue 19), tried against the
command line: every case ends in one ``error:`` line (exit 2) or a clean interruption (exit 130),
never a traceback, a partial file, a leftover temporary file or a folder mixing two runs."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, smooth_textures, to_batch
from utils.cli import main
from utils.data.demo.mvtec import generate_mvtec
from utils.files import staged_folder
from utils.padim.model import Padim

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _run(argv, capsys):
    code = main([*argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _hidden(folder) -> list[str]:
    """Temporary files or folders (``.tmp-*``, ``.<name>.tmp-*``, ``.<name>.old-*``) left in ``folder``."""
    return [name for name in os.listdir(folder) if name.startswith(".")]


def _listing(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """A small generated MVTec-layout category (40 px) and a config for it."""
    base = tmp_path_factory.mktemp("mvtec")
    root = generate_mvtec(str(base / "cat"), seed=0, size=40, n_train=12, n_good=4, n_per_defect=3)
    return root


def _mvtec_config(folder, root, **top) -> str:
    raw = {"image_size": 32, "output_dimension": 8, "device": "cpu", "results_dir": str(folder / "results"), **top,
           "data": {"format": "mvtec", "root": root, "val_fraction": 0.25, "color": "rgb", "resize": "stretch"}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def fitted(small_settings, tmp_path):
    """(config path, model path) of a small model fitted on textures."""
    model = Padim(small_settings).fit(to_batch(smooth_textures(6, 64, seed=1)), progress=False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_settings.to_dict()))
    return str(config), model.save(tmp_path / "m.pt")


def _images(folder, count: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, gray in enumerate(smooth_textures(count, 64, seed=seed)):
        names.append(str(folder / f"i{index:02d}.png"))
        Image.fromarray((gray * 255).astype(np.uint8)).save(names[-1])
    return names


# ---------------------------------------------------------------- 1. one line, not a traceback
def test_a_decode_failure_in_a_dataloader_worker_is_one_line(tmp_path, category, capsys):
    """A truncated JPEG passes the listing check (Pillow's verify) and fails in a worker process."""
    root = tmp_path / "cat"
    shutil.copytree(category, root)
    for victim in (root / "train" / "good").iterdir():  # every one: which are held out for validation is seeded
        buffer = io.BytesIO()
        Image.open(victim).convert("RGB").save(buffer, "JPEG")
        victim.write_bytes(buffer.getvalue()[:-20])
        Image.open(victim).verify()  # the premise: the damage is only found when decoding
    config = _mvtec_config(tmp_path, str(root))
    text = open(config).read().replace("val_fraction", "num_workers: 2\n  val_fraction")
    open(config, "w").write(text)
    code, err, _ = _run(["fit", "--config", config, "--output", str(tmp_path / "m.pt")], capsys)
    line = _one_error_line(err)
    assert code == 2 and line.startswith(f"error: cannot read image {root / 'train' / 'good'}") and "worker" not in line
    assert not (tmp_path / "m.pt").exists() and _hidden(tmp_path) == []


def test_demo_root_that_is_a_file_is_named_as_such(tmp_path, capsys):
    blocker = tmp_path / "demo"
    blocker.write_text("a file")
    config = tmp_path / "c.yaml"
    config.write_text(f"image_size: 32\noutput_dimension: 8\ndata:\n  root: {blocker}\n")
    code, err, _ = _run(["fit", "--config", str(config), "--output", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and f"data.root {blocker} is a file" in _one_error_line(err)


def test_predict_accepts_a_single_image_file(fitted, tmp_path, capsys):
    config, model = fitted
    image = _images(tmp_path / "in", 1)[0]
    code, _, out = _run(["predict", "--config", config, "--model", model, "--input", image, "--output", str(tmp_path / "o")], capsys)
    assert code == 0 and "1 images scored" in out
    assert sorted(os.listdir(tmp_path / "o")) == ["i00_anomaly.npy", "i00_heatmap.png", "predict_files.json", "scores.csv"]


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root writes and reads whatever the modes")
@pytest.mark.parametrize("command", ["fit", "evaluate", "predict"])
def test_an_unwritable_results_folder_fails_before_the_work(fitted, tmp_path, capsys, command):
    config, model = fitted
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    text = open(config).read().replace("results_dir: results", f"results_dir: {locked / 'r'}")
    open(config, "w").write(text)
    argv = {"fit": ["fit", "--config", config],
            "evaluate": ["evaluate", "--config", config],
            "predict": ["predict", "--config", config, "--model", model, "--input", _images(tmp_path / "in", 1)[0],
                        "--output", str(locked / "o")]}[command]
    code, err, _ = _run(argv, capsys)
    assert code == 2 and str(locked) in _one_error_line(err)


# ---------------------------------------------------------------- 2. interruptions
_WRITE_INTERRUPTED = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import utils.cli as cli
import utils.padim.model_file as model_file
from utils.config import Settings
from utils.padim.model import Padim

class Interrupting:
    # the signal arrives in the middle of the archive, as a Ctrl-C during a long write does
    def __init__(self, stream):
        self.stream, self.written = stream, 0
    def write(self, data):
        self.written += len(data)
        if self.written > 1 << 20 and self.written - len(data) <= 1 << 20:
            os.kill(os.getpid(), {signum})
        return self.stream.write(data)
    def __getattr__(self, name):
        return getattr(self.stream, name)

real_save = torch.save
model_file.torch.save = lambda payload, stream: real_save(payload, Interrupting(stream))

def fit(args, settings):
    settings = Settings(image_size=64, output_dimension=None, device="cpu")
    model = Padim(settings)
    model.mean = torch.zeros(settings.feature_size ** 2, settings.kept_channels)
    model.cholesky = torch.eye(settings.kept_channels).repeat(settings.feature_size ** 2, 1, 1)
    model.train_count = 3
    model.save({output!r})
    return 0

cli.COMMANDS["fit"] = fit
sys.exit(cli.main(["fit", "--config", os.path.join({root!r}, "config.yaml")]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_model_write_exits_130_and_leaves_no_file(tmp_path, signum):
    output = tmp_path / "out" / "model.pt"
    script = _WRITE_INTERRUPTED.format(root=ROOT, signum=int(signum), output=str(output))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "enforce fail" not in done.stderr
    assert os.listdir(output.parent) == []  # neither the model nor a hidden .tmp-*.pt


_DEMO_INTERRUPTED = """
import os, signal, sys
sys.path.insert(0, {root!r})
from PIL import Image
import utils.demo_data as demo_data
saved, real = [0], Image.Image.save
def save(self, *args, **kwargs):
    saved[0] += 1
    if saved[0] == 20:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *args, **kwargs)
Image.Image.save = save
sys.exit(demo_data.main([{target!r}]))
"""


def test_sigterm_during_demo_generation_leaves_nothing(tmp_path):
    target = tmp_path / "demo"
    script = _DEMO_INTERRUPTED.format(root=ROOT, target=str(target))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and "interrupted" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []  # no demo folder, no .demo.tmp-*


def test_a_failed_predict_leaves_the_earlier_output_as_it_was(fitted, tmp_path, capsys):
    config, model = fitted
    inputs = tmp_path / "in"
    names = _images(inputs, 12)
    output = tmp_path / "out"
    assert _run(["predict", "--config", config, "--model", model, "--input", str(inputs), "--output", str(output)], capsys)[0] == 0
    before = _listing(output)
    assert len(before) == 26  # 12 heat-maps, 12 anomaly maps, scores.csv and the file list
    with open(names[10], "wb") as handle:
        handle.write(b"not an image")  # fails after the first batch (batch_size 8) was written
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(inputs), "--output", str(output)], capsys)
    assert code == 2 and names[10] in _one_error_line(err)
    assert _listing(output) == before and _hidden(tmp_path) == []
    code, _, _ = _run(["predict", "--config", config, "--model", model, "--input", str(inputs), "--output", str(tmp_path / "new")], capsys)
    assert code == 2 and not (tmp_path / "new").exists() and _hidden(tmp_path) == []


def test_a_new_predict_replaces_the_earlier_output_as_a_whole(fitted, tmp_path, capsys):
    config, model = fitted
    output = tmp_path / "out"
    _images(tmp_path / "a", 3)
    assert _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "a"), "--output", str(output)], capsys)[0] == 0
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(tmp_path / "b" / "z.png")
    assert _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "b"), "--output", str(output)], capsys)[0] == 0
    assert sorted(os.listdir(output)) == ["predict_files.json", "scores.csv", "z_anomaly.npy", "z_heatmap.png"]  # nothing of the first run is left
    assert _hidden(tmp_path) == []


def test_staged_folder_swaps_in_whole_or_not_at_all(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(target) as folder:
            open(os.path.join(folder, "new.txt"), "w").write("new")
            raise RuntimeError("fails half-way")
    assert os.listdir(target) == ["old.txt"] and _hidden(tmp_path) == []
    with staged_folder(target) as folder:
        open(os.path.join(folder, "new.txt"), "w").write("new")
    assert os.listdir(target) == ["new.txt"] and _hidden(tmp_path) == []
    with pytest.raises(FileExistsError):
        with staged_folder(target, replace=False) as folder:
            pass
    assert os.listdir(target) == ["new.txt"] and _hidden(tmp_path) == []


# ---------------------------------------------------------------- 3. no silent overwrite, no wrong result
def test_predict_refuses_an_output_inside_the_input_and_a_folder_of_other_files(fitted, tmp_path, capsys):
    config, model = fitted
    inputs = tmp_path / "in"
    _images(inputs, 2)
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(inputs), "--output", str(inputs / "out")], capsys)
    assert code == 2 and "is inside --input" in _one_error_line(err) and not (inputs / "out").exists()
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(inputs), "--output", str(other)], capsys)
    assert code == 2 and "holds other files" in _one_error_line(err)
    assert os.listdir(other) == ["thesis.tex"]


def test_a_model_fitted_on_other_training_images_is_refused_by_evaluate(tmp_path, category, capsys):
    config = _mvtec_config(tmp_path, category)
    assert _run(["fit", "--config", config, "--output", str(tmp_path / "m.pt")], capsys)[0] == 0
    root = tmp_path / "cat"
    shutil.copytree(category, root)
    os.remove(sorted((root / "train" / "good").iterdir())[0])  # other training images, same config otherwise
    (tmp_path / "other").mkdir()
    other = _mvtec_config(tmp_path / "other", str(root))
    code, err, _ = _run(["evaluate", "--config", other, "--model", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "fitted on other training images" in _one_error_line(err)
    assert not (tmp_path / "other" / "results").exists()


def test_each_run_folder_describes_one_run(tmp_path, category, capsys):
    """Changed data give another folder; a rerun replaces its folder as a whole (no stale figures)."""
    root = tmp_path / "cat"
    shutil.copytree(category, root)
    config = _mvtec_config(tmp_path, str(root))
    results = tmp_path / "results"
    assert _run(["evaluate", "--config", config, "--no-save-model"], capsys)[0] == 0
    (first,) = os.listdir(results)
    assert os.path.isdir(results / first / "figures")
    assert _run(["evaluate", "--config", config, "--no-save-model", "--no-figures"], capsys)[0] == 0
    assert os.listdir(results) == [first]
    assert sorted(os.listdir(results / first)) == ["config.yaml", "metrics.csv", "metrics.md", "timings.json"]
    defect = sorted(d for d in os.listdir(root / "test") if d != "good")[0]
    shutil.copy(root / "test" / defect / "000.png", root / "test" / defect / "100.png")
    shutil.copy(root / "ground_truth" / defect / "000_mask.png", root / "ground_truth" / defect / "100_mask.png")
    assert _run(["evaluate", "--config", config, "--no-save-model", "--no-figures"], capsys)[0] == 0
    assert len(os.listdir(results)) == 2  # the earlier run's folder is still there, untouched
    with open(results / first / "metrics.csv", newline="") as handle:
        counts = {row["group"]: row["n_images"] for row in csv.DictReader(handle)}
    assert counts[defect] == "3"


def test_a_batch_larger_than_the_data_set_fits_what_exists(small_settings):
    """Buffers follow the images, not the setting: a batch size of 10^7 is harmless."""
    images = to_batch(smooth_textures(30, 64, seed=4))
    huge = Padim(small_settings.replace(batch_size=10_000_000)).fit(images, progress=False)
    small = Padim(small_settings.replace(batch_size=2)).fit(images, progress=False)
    torch.testing.assert_close(huge.mean, small.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(huge.cholesky, small.cholesky, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("change, fragment", [
    (lambda p: p.update(mean=p["mean"].tolist()), "`mean` is list, not a tensor"),
    (lambda p: p["cholesky"].view(-1)[7].fill_(float("nan")), "`cholesky` holds NaN or Inf"),
    (lambda p: p.update(cholesky=p["cholesky"][:, :5, :5]), "`cholesky` is torch.float32"),
    (lambda p: p.update(train_fingerprint=["x"]), "`train_fingerprint` is ['x']"),
    (lambda p: p.update(train_count=-1), "`train_count` is -1"),
])
def test_a_hand_edited_model_file_is_one_error_line(fitted, tmp_path, capsys, change, fragment):
    config, model = fitted
    payload = torch.load(model, weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / "edited.pt")
    _images(tmp_path / "in", 1)
    code, err, _ = _run(["predict", "--config", config, "--model", str(tmp_path / "edited.pt"),
                         "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and fragment in _one_error_line(err) and not (tmp_path / "o").exists()


def test_a_fit_reports_its_training_files_in_the_model(tmp_path, category, capsys):
    config = _mvtec_config(tmp_path, category)
    assert _run(["fit", "--config", config], capsys)[0] == 0
    (run,) = os.listdir(tmp_path / "results")
    stored = Padim.load(str(tmp_path / "results" / run / "model.pt")).train_fingerprint
    assert len(stored) == 12 and int(stored, 16) >= 0


def test_demo_generator_script_errors_are_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    done = subprocess.run([sys.executable, "-m", "utils.demo_data", str(tmp_path / "full")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "not empty" in done.stderr



def test_skip_bad_images_skips_a_decode_failure_with_one_warning_line(tmp_path, capsys):
    from utils.data.demo.brains import DemoCounts, generate_demo

    root = generate_demo(str(tmp_path / "demo"), seed=0, counts=DemoCounts(ixi_train=6, fastmri_train=4, val=2, per_kind=2, normal_test=2))
    victim = sorted((tmp_path / "demo" / "data" / "IXI").iterdir())[1]
    buffer = io.BytesIO()
    Image.open(victim).convert("L").save(buffer, "JPEG")
    victim.write_bytes(buffer.getvalue()[:-20])  # passes Pillow's verify, fails when decoded
    config = tmp_path / "c.yaml"
    config.write_text(f"image_size: 32\noutput_dimension: 8\ndata:\n  format: study\n  root: {root}\n  skip_bad_images: true\n")
    code, err, out = _run(["fit", "--config", str(config), "--output", str(tmp_path / "m.pt")], capsys)
    assert code == 0 and "model written" in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: skipping") and str(victim) in lines[0], err


def test_predict_keeps_a_users_files_and_follows_a_linked_output(fitted, tmp_path, capsys):
    config, model = fitted
    _images(tmp_path / "in", 2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scores.csv").write_text("my own table")  # looks like an output, was not written by predict
    (mine / "thesis.tex").write_text("precious")
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "in"), "--output", str(mine)], capsys)
    assert code == 2 and "holds other files" in _one_error_line(err)
    assert sorted(os.listdir(mine)) == ["scores.csv", "thesis.tex"]
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for _ in range(2):  # the second run replaces the first run's outputs behind the link
        assert _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "in"), "--output", str(link)], capsys)[0] == 0
    assert link.is_symlink() and sorted(os.listdir(link)) == sorted(os.listdir(real))
    assert "scores.csv" in os.listdir(real) and _hidden(tmp_path) == []


def test_fit_output_over_a_file_that_is_not_a_model_is_refused(tmp_path, category, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    config = _mvtec_config(tmp_path, category)
    code, err, _ = _run(["fit", "--config", config, "--output", str(notes)], capsys)
    assert code == 2 and "is not a model file" in _one_error_line(err) and notes.read_text() == "my notes"


def test_a_write_that_fails_names_the_target_not_the_temporary_file(tmp_path):
    import errno

    from utils.files import atomic_writer

    target = tmp_path / "metrics.csv"
    with pytest.raises(OSError) as info:
        with atomic_writer(target) as stream:
            stream.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert os.listdir(tmp_path) == []


def test_a_colour_image_among_gray_study_images_is_one_line(tmp_path, capsys):
    from utils.data.demo.brains import DemoCounts, generate_demo

    root = generate_demo(str(tmp_path / "demo"), seed=0, counts=DemoCounts(ixi_train=4, fastmri_train=2, val=2, per_kind=2, normal_test=2))
    victim = sorted((tmp_path / "demo" / "data" / "IXI").iterdir())[0]
    Image.open(victim).convert("RGB").save(victim)
    config = tmp_path / "c.yaml"
    config.write_text(f"image_size: 32\noutput_dimension: 8\ndata:\n  format: study\n  root: {root}\n")
    code, err, _ = _run(["fit", "--config", str(config), "--output", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "mixes colour and gray images" in _one_error_line(err) and str(victim) in err


@pytest.mark.parametrize("argv", [[], ["predict", "--config", "x.yaml"], ["fit", "--bogus"]])
def test_usage_errors_are_one_line(argv):
    done = subprocess.run([sys.executable, "-m", "utils", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.mkdir(), "config file is a folder, not a file"),
    (lambda p: p.write_text("seed: " + "[" * 3000 + "]" * 3000 + "\n"), "nested too deeply"),
])
def test_odd_config_files_are_one_line(tmp_path, capsys, make, fragment):
    path = tmp_path / "config.yaml"
    make(path)
    code, err, _ = _run(["fit", "--config", str(path)], capsys)
    assert code == 2 and fragment in _one_error_line(err)


def test_a_changed_byte_inside_a_model_file_is_found(fitted, tmp_path, capsys):
    import zipfile

    config, model = fitted
    with zipfile.ZipFile(model) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)  # the Cholesky factors
    data = bytearray(open(model, "rb").read())
    data[entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + entry.file_size // 2] ^= 0x01
    damaged = tmp_path / "flipped.pt"
    damaged.write_bytes(bytes(data))
    code, err, _ = _run(["predict", "--config", config, "--model", str(damaged), "--input", _images(tmp_path / "in", 1)[0],
                         "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "fails its checksum" in _one_error_line(err)


def test_a_pickled_object_as_model_file_is_one_line_without_warnings(fitted, tmp_path, capsys):
    import pickle

    config, _ = fitted
    path = tmp_path / "pickled.pt"
    path.write_bytes(pickle.dumps({"mean": [1, 2, 3]}))
    code, err, _ = _run(["predict", "--config", config, "--model", str(path), "--input", _images(tmp_path / "in", 1)[0],
                         "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "is not a readable PaDiM model file" in _one_error_line(err)


def test_a_float_image_with_inf_names_its_file(fitted, tmp_path, capsys):
    config, model = fitted
    (tmp_path / "in").mkdir()
    image = tmp_path / "in" / "inf.tif"
    Image.fromarray(np.full((64, 64), np.inf, np.float32)).save(image)
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(image), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and f"image {image} holds NaN or Inf values" in _one_error_line(err)


_DURING_IMPORT = """
import os, sys
sys.path.insert(0, {root!r})

class SignalOnTorch:  # the signal arrives exactly while torch is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {signum})
        return None

sys.meta_path.insert(0, SignalOnTorch())
sys.argv = ["python -m utils", "fit", "--config", {config!r}, "--quiet"]
import runpy
runpy.run_module("utils", run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_torch_is_still_being_imported_is_a_clean_interruption(tmp_path, signum):
    config = tmp_path / "c.yaml"
    config.write_text(f"image_size: 32\noutput_dimension: 8\ndata:\n  root: {tmp_path / 'demo'}\n")
    script = _DURING_IMPORT.format(root=ROOT, signum=int(signum), config=str(config))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_a_full_disk_during_the_model_write_is_an_os_error_not_torchs_runtime_error(fitted, tmp_path, monkeypatch):
    import contextlib
    import errno

    import utils.padim.model_file as model_file

    class FullDisk(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(model_file, "atomic_writer", lambda path, durable: contextlib.nullcontext(FullDisk()))
    _, path = fitted
    with pytest.raises(OSError) as info:
        Padim.load(path).save(tmp_path / "again.pt")
    assert info.value.errno == errno.ENOSPC


def test_fit_output_over_another_torch_checkpoint_is_refused(tmp_path, category, capsys):
    checkpoint = tmp_path / "mine.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}}, checkpoint)
    before = checkpoint.read_bytes()
    code, err, _ = _run(["fit", "--config", _mvtec_config(tmp_path, category), "--output", str(checkpoint)], capsys)
    assert code == 2 and "is not a model file" in _one_error_line(err) and checkpoint.read_bytes() == before


def test_an_input_inside_an_earlier_output_is_never_replaced(fitted, tmp_path, capsys):
    """The earlier output's own heat-maps given as input: the swap would have deleted them."""
    config, model = fitted
    out = tmp_path / "out"
    _images(tmp_path / "in" / "sub", 2)
    assert _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "in"), "--output", str(out)],
                capsys)[0] == 0
    before = sorted(p.name for p in (out / "sub").iterdir())
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(out / "sub"), "--output", str(out)],
                        capsys)
    assert code == 2 and "is inside --output" in _one_error_line(err)
    assert sorted(p.name for p in (out / "sub").iterdir()) == before


def test_an_output_inside_the_input_is_found_through_links(fitted, tmp_path, capsys):
    config, model = fitted
    inputs = tmp_path / "in"
    _images(inputs, 2)
    (tmp_path / "via").symlink_to(inputs, target_is_directory=True)
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "via"),
                         "--output", str(inputs / "out")], capsys)
    assert code == 2 and "is inside --input" in _one_error_line(err) and not (inputs / "out").exists()


def test_a_damaged_file_list_makes_the_folder_someone_elses(fitted, tmp_path, capsys):
    config, model = fitted
    _images(tmp_path / "in", 1)
    output = tmp_path / "out"
    assert _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "in"), "--output", str(output)], capsys)[0] == 0
    (output / "predict_files.json").write_text("[" * 200_000 + "]" * 200_000)
    code, err, _ = _run(["predict", "--config", config, "--model", model, "--input", str(tmp_path / "in"), "--output", str(output)], capsys)
    assert code == 2 and "holds other files" in _one_error_line(err)


def test_a_file_name_that_is_not_utf8_has_a_fingerprint(tmp_path):
    from utils.data import fingerprint

    odd = os.path.join(os.fsencode(tmp_path), b"\xff1.png")
    with open(odd, "wb") as handle:
        handle.write(b"x")
    other = tmp_path / "2.png"
    other.write_bytes(b"y")
    assert len(fingerprint([_Listed([os.fsdecode(odd), str(other)])])) == 12


class _Listed:
    def __init__(self, files):
        self.rows = [(f,) for f in files]
