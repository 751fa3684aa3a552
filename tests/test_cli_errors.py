"""The one command-line boundary (issues 19 and 26): a bad config, file-system state, input or model file
ends in one ``error:`` line and exit 2, and the folders hold afterwards exactly what they held before
(nothing written, nothing of the user's removed, no temporary left); every exception type has its one
line; Ctrl-C or SIGTERM at any moment is exit 130 with nothing left; a rerun replaces its folder as a whole."""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, smooth_textures, to_batch
from utils.boundary import run_command
from utils.cli import main
from utils.config import settings_from_dict
from utils.data.demo.brains import DemoCounts, generate_demo
from utils.data.demo.mvtec import generate_mvtec
from utils.padim.model import Padim

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
as_user = pytest.mark.skipif(RUNNING_AS_ROOT, reason="root reads and writes whatever the modes")


def cli(argv, capsys) -> tuple[int, str, str]:
    """Exit code, stderr and stdout of ``python -m utils *argv --quiet``, run in this process."""
    try:
        code = main([*argv, "--quiet"])
    except SystemExit as exc:  # a usage error: argparse exits
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def snapshot(folder) -> dict:
    """Every entry below ``folder``, hidden ones too: a file's inode, size and modification time."""
    entries = {}
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            entry = None if name in folders else (info.st_ino, info.st_size, info.st_mtime_ns)
            entries[os.path.relpath(path, folder)] = entry
    return entries


def write(path, content: str | bytes = "x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def images(folder, count: int = 1) -> str:
    """``folder`` with ``count`` gray 64 px PNGs ``i00.png``, ``i01.png``, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, gray in enumerate(smooth_textures(count, 64, seed=0)):
        Image.fromarray((gray * 255).astype(np.uint8)).save(folder / f"i{index:02d}.png")
    return str(folder)


def predict(ctx, source, output, model=None) -> list[str]:
    return ["predict", "--config", ctx.config, "--model", str(model or ctx.model), "--input", str(source),
            "--output", str(output)]


def mvtec_config(folder, root, data=(), **top) -> str:
    raw = {"image_size": 32, "output_dimension": 8, "device": "cpu", "results_dir": str(folder / "results"), **top,
           "data": {"format": "mvtec", "root": str(root), "val_fraction": 0.25, "color": "rgb", "resize": "stretch",
                    **dict(data)}}
    return str(write(folder / "config.yaml", yaml.safe_dump(raw)))


def truncated_jpeg(path) -> None:
    """The image at ``path`` rewritten as a JPEG without its end: it passes Pillow's verify(), decoding fails."""
    buffer = io.BytesIO()
    Image.open(path).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:-20])
    Image.open(path).verify()  # the premise: the damage is only found when decoding


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A model fitted on textures and its config; a small MVTec-layout category (40 px) and a model fitted on it."""
    folder = tmp_path_factory.mktemp("ctx")
    settings = settings_from_dict({"image_size": 64, "output_dimension": 24, "device": "cpu", "batch_size": 8})
    model = Padim(settings).fit(to_batch(smooth_textures(6, 64, seed=1)), progress=False).save(folder / "m.pt")
    category = generate_mvtec(str(folder / "cat"), seed=0, size=40, n_train=12, n_good=4, n_per_defect=3)
    assert main(["fit", "--config", mvtec_config(folder, category), "--output", str(folder / "cat.pt"), "--quiet"]) == 0
    return types.SimpleNamespace(config=str(write(folder / "c.yaml", yaml.safe_dump(settings.to_dict()))), model=model,
                                 category=category, category_model=str(folder / "cat.pt"))


# ---------------------------------------------------------------- builders of bad states: (tmp, ctx) -> argv
def config_text(text: str | bytes, command: str = "fit"):
    def make(tmp, ctx):
        config = str(write(tmp / "config.yaml", text.replace("{tmp}", str(tmp)) if isinstance(text, str) else text))
        return [command, "--config", config] + (["--output", str(tmp / "m.pt")] if command == "fit" else [])
    return make


def manifest_with_a_huge_field(tmp, ctx):
    write(tmp / "m.csv", 'split,image\ntrain,"' + "x" * 200_000 + '"\n')
    return config_text("data:\n  format: nifti\n  manifest: {tmp}/m.csv\n")(tmp, ctx)


def unreadable_config(tmp, ctx):
    config = write(tmp / "config.yaml", "seed: 0\n")
    config.chmod(0)
    return ["fit", "--config", str(config)]


def unwritable_results(command):
    def make(tmp, ctx):
        (tmp / "locked").mkdir(mode=0o555)
        if command == "predict":
            return predict(ctx, images(tmp / "in"), tmp / "locked" / "o")
        text = open(ctx.config).read().replace("results_dir: results", f"results_dir: {tmp}/locked/r")
        return [command, "--config", str(write(tmp / "c.yaml", text))]
    return make


def output_inside_input_via_a_link(tmp, ctx):
    (tmp / "via").symlink_to(images(tmp / "in", 2), target_is_directory=True)
    return predict(ctx, tmp / "via", tmp / "in" / "out")


def earlier_output(tmp, ctx, count=1):
    """A predict's output folder ``tmp/out`` of the images in ``tmp/in`` (``count`` of them, in ``tmp/in/sub``)."""
    images(tmp / "in" / "sub", count)
    argv = predict(ctx, tmp / "in", tmp / "out")
    assert main(argv + ["--quiet"]) == 0
    return argv


def damaged_file_list(tmp, ctx):
    argv = earlier_output(tmp, ctx)
    write(tmp / "out" / "predict_files.json", "[" * 200_000 + "]" * 200_000)
    return argv


def input_inside_earlier_output(tmp, ctx):  # the swap would delete the output's own heat-maps given as input
    earlier_output(tmp, ctx)
    return predict(ctx, tmp / "out" / "sub", tmp / "out")


def image_failing_after_the_first_batch(tmp, ctx):  # batch_size 8: the first batch was written when image 10 fails
    argv = earlier_output(tmp, ctx, count=12)
    write(tmp / "in" / "sub" / "i10.png", "not an image")
    return argv


def infinite_float_image(tmp, ctx):
    (tmp / "in").mkdir()
    Image.fromarray(np.full((64, 64), np.inf, np.float32)).save(tmp / "in" / "inf.tif")
    return predict(ctx, tmp / "in" / "inf.tif", tmp / "o")


def changed_byte_in_the_model(tmp, ctx):
    with zipfile.ZipFile(ctx.model) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor
    data = bytearray(open(ctx.model, "rb").read())
    data[entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + entry.file_size // 2] ^= 0x01
    return predict(ctx, images(tmp / "in"), tmp / "o", model=write(tmp / "flipped.pt", bytes(data)))


def torch_checkpoint_as_fit_output(tmp, ctx):
    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp / "mine.pth")
    return ["fit", "--config", mvtec_config(tmp, ctx.category), "--output", str(tmp / "mine.pth")]


def truncated_jpegs_read_in_workers(tmp, ctx):
    """Truncated JPEGs pass the listing check (Pillow's verify) and fail in a DataLoader worker."""
    root = shutil.copytree(ctx.category, tmp / "cat")
    for victim in (root / "train" / "good").iterdir():  # every one: which are held out for validation is seeded
        truncated_jpeg(victim)
    return ["fit", "--config", mvtec_config(tmp, root, data={"num_workers": 2}), "--output", str(tmp / "m.pt")]


def colour_image_among_gray_ones(tmp, ctx):
    counts = DemoCounts(ixi_train=4, fastmri_train=2, val=2, per_kind=2, normal_test=2)
    root = generate_demo(str(tmp / "demo"), counts=counts)
    victim = sorted((tmp / "demo" / "data" / "IXI").iterdir())[0]
    Image.open(victim).convert("RGB").save(victim)
    return config_text(f"image_size: 32\noutput_dimension: 8\ndata:\n  format: study\n  root: {root}\n")(tmp, ctx)


def model_of_other_training_images(tmp, ctx):
    root = shutil.copytree(ctx.category, tmp / "cat", copy_function=shutil.copy2)  # times kept: the same files
    argv = ["evaluate", "--config", mvtec_config(tmp, root), "--model", ctx.category_model, "--no-figures",
            "--no-save-model"]
    assert main(argv + ["--quiet"]) == 0  # the fit recorded its training files: the same files are accepted
    os.remove(sorted((root / "train" / "good").iterdir())[0])
    return argv


BAD = [  # (builder, a fragment of the one error line; {tmp} is the test's folder)
    (config_text(b"seed: 1\nbatch_size: 3\nseed: 2\n"), "key `seed` is written twice (lines 1 and 3)"),
    (config_text(b"data:\n\tformat: demo\n"), "a tab character is used for indentation"),
    (config_text(b"results_dir: r\xe9sultats\n"), "is not UTF-8 text (byte 0xe9"),
    (config_text(b"seed: 18446744073709551616\n"), "`seed` is 18446744073709551616"),
    (config_text("seed: " + "[" * 3000 + "]" * 3000 + "\n"), "nested too deeply"),
    (config_text("? [a, b]\n: 1\n"), "not valid YAML: a key is a list or mapping (line 1)"),  # YAML complex keys
    (config_text("seed: 1\n? {a: 1}\n: 1\n"), "not valid YAML: a key is a list or mapping (line 2)"),
    (config_text("results_dir: ~nosuchuser_zz/x\n"), "`results_dir` is '~nosuchuser_zz/x': no user 'nosuchuser_zz'"),
    (config_text("seeds: 1\n"), "did you mean `seed`"),
    (config_text("data:\n  format: study\n  root: /nonexistent/fast_ixi\n"), "data.zip"),
    (manifest_with_a_huge_field, "m.csv line 2: field larger than field limit"),  # a csv.Error
    (lambda tmp, ctx: ["fit", "--config", str(tmp)], "config file is a folder, not a file"),
    (lambda tmp, ctx: ["fit", "--config", str(tmp / "none.yaml")], "config file not found"),
    pytest.param(unreadable_config, "cannot read config file", marks=as_user),
    (lambda tmp, ctx: [], "required: command"),
    (lambda tmp, ctx: ["predict", "--config", "x.yaml"], "required: --model, --input, --output"),
    (lambda tmp, ctx: ["fit", "--bogus"], "unrecognized arguments: --bogus"),
    (config_text("results_dir: {tmp}/config.yaml\ndata:\n  root: {tmp}/demo\n", "evaluate"), "{tmp}/config.yaml"),
    (lambda tmp, ctx: ["fit", "--config", ctx.config, "--output", str(tmp)], "is a folder; give the model file"),
    (lambda tmp, ctx: ["fit", "--config", ctx.config, "--output", f"{tmp}/models/"], "is a folder; give the model file"),
    (lambda tmp, ctx: ["fit", "--config", mvtec_config(tmp, ctx.category), "--output", str(write(tmp / "notes.txt"))],
     "is not a model file"),
    (torch_checkpoint_as_fit_output, "is not a model file"),
    (config_text("data:\n  root: {tmp}/config.yaml\n"), "data.root {tmp}/config.yaml is a file"),
    *[pytest.param(unwritable_results(name), "{tmp}/locked", marks=as_user) for name in ["fit", "evaluate", "predict"]],
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), write(tmp / "out")), "{tmp}/out"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), tmp / "in" / "out"), "is inside --input"),
    (output_inside_input_via_a_link, "is inside --input"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), write(tmp / "docs" / "thesis.tex").parent), "holds other files"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), write(tmp / "mine" / "scores.csv").parent), "holds other files"),
    (damaged_file_list, "holds other files"),
    (input_inside_earlier_output, "is inside --output"),
    (image_failing_after_the_first_batch, "{tmp}/in/sub/i10.png"),
    (infinite_float_image, "inf.tif holds NaN or Inf values"),
    (truncated_jpegs_read_in_workers, "error: cannot read image {tmp}/cat/train/good"),
    (colour_image_among_gray_ones, "mixes colour and gray images"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), tmp / "o", model=tmp / "x.pt"), "model file not found"),
    (changed_byte_in_the_model, "fails its checksum"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), tmp / "o", model=write(tmp / "p.pt", pickle.dumps([1]))),
     "is not a readable PaDiM model file"),
    (model_of_other_training_images, "fitted on other training images"),
]


@pytest.mark.parametrize("make, fragment", BAD)
def test_a_bad_input_is_one_error_line_and_changes_no_file(ctx, tmp_path, capsys, make, fragment):
    argv = make(tmp_path, ctx)
    capsys.readouterr()
    before = snapshot(tmp_path)
    code, err, _ = cli(argv, capsys)
    lines = err.strip().splitlines()  # a warning would be a line of its own
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment.format(tmp=tmp_path) in lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("raised, code, line", [
    (lambda: (_ for _ in ()).throw(ValueError("batch size\nwith a second line")), 2, "error: ValueError: batch size (set PADIM_DEBUG=1"),
    (lambda: {}["missing"], 2, "error: KeyError: 'missing' (set PADIM_DEBUG=1"),
    (lambda: (_ for _ in ()).throw(RecursionError()), 2, "error: RecursionError: (no message)"),
    (lambda: open("/nonexistent/x"), 2, "error: /nonexistent/x: No such file or directory"),
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), 130, "interrupted: no partial files were written"),
])
def test_every_exception_ends_as_one_line_and_its_exit_code(raised, code, line, capsys, monkeypatch):
    monkeypatch.delenv("PADIM_DEBUG", raising=False)
    assert run_command(raised) == code
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1


def test_padim_debug_shows_the_traceback_of_an_unexpected_error(monkeypatch):
    monkeypatch.setenv("PADIM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 / 0)


# ---------------------------------------------------------------- interruptions and reruns
_PRELUDE = """
import os, signal, sys
sys.path.insert(0, {root!r})
def interrupt():
    os.kill(os.getpid(), {signum})
def interrupt_at(owner, name, call):  # the signal arrives as owner.name is called the call-th time
    real, calls = getattr(owner, name), [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            interrupt()
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)
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

_DURING_WRITE = """
import torch
import utils.padim.model_file as model_file
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
real_save = torch.save
model_file.torch.save = lambda payload, stream: real_save(payload, Interrupting(stream))
"""

_FIT = """
import utils.cli as cli
sys.exit(cli.main(["fit", "--config", {config!r}, "--output", {model!r}]))
"""

_DURING_FIT = "from utils.padim.model import Padim\ninterrupt_at(Padim, 'accumulate', 1)\n" + _FIT

_DURING_DEMO = """
from PIL import Image
import utils.demo_data as demo_data
interrupt_at(Image.Image, "save", 20)
sys.exit(demo_data.main([{demo!r}]))
"""


@pytest.mark.parametrize("script, signum", [
    (_DURING_IMPORT, signal.SIGINT), (_DURING_IMPORT, signal.SIGTERM),
    (_DURING_FIT, signal.SIGINT), (_DURING_WRITE + _FIT, signal.SIGINT), (_DURING_WRITE + _FIT, signal.SIGTERM),
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


def two_truncated_training_images(tmp, ctx):
    counts = DemoCounts(ixi_train=6, fastmri_train=4, val=2, per_kind=2, normal_test=2)
    root = generate_demo(str(tmp / "demo"), seed=0, counts=counts)
    victims = sorted((tmp / "demo" / "data" / "IXI").iterdir())[1:3]
    for victim in victims:
        truncated_jpeg(victim)
    text = f"image_size: 32\noutput_dimension: 8\ndata:\n  format: study\n  root: {root}\n  skip_bad_images: true\n"
    return ["fit", "--config", str(write(tmp / "c.yaml", text)), "--output", str(tmp / "m.pt")], victims


def two_gradient_masks(tmp, ctx):
    root = shutil.copytree(ctx.category, tmp / "cat", copy_function=shutil.copy2)  # the model's training files
    victims = sorted((root / "ground_truth").rglob("*_mask.png"))[:2]
    for victim in victims:  # 0 outside, 16 levels from 15 to 255 inside: half the range (127.5) drops the lower ones
        inside = np.asarray(Image.open(victim)) > 0
        levels = np.where(inside, 15 + 16 * (np.indices(inside.shape).sum(0) % 16), 0)
        Image.fromarray(levels.astype(np.uint8)).save(victim)
    return ["evaluate", "--config", mvtec_config(tmp, root), "--model", ctx.category_model, "--no-figures",
            "--no-save-model"], victims


@pytest.mark.parametrize("make, start", [
    (two_truncated_training_images, "warning: skipping"),
    (two_gradient_masks, "warning: mask "),
])
def test_a_problem_of_several_files_is_one_warning_line_naming_one_and_the_count(ctx, tmp_path, capsys, make, start):
    argv, victims = make(tmp_path, ctx)
    code, err, out = cli(argv, capsys)
    assert code == 0 and out, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and lines[0].endswith("(and 1 more like it)"), err
    assert any(str(victim) in lines[0] for victim in victims)
