"""The one command-line boundary: a bad config, file-system state, input or model file is one ``error:`` line, exit 2,
no file changed; every exception has its one line; Ctrl-C or SIGTERM is exit 130, nothing left; reruns replace whole."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, smooth_textures, to_batch, truncated_jpeg
from utils.boundary import run_command
from utils.cli import main
from utils.config import settings_from_dict
from utils.data.demo.mvtec import generate_mvtec
from utils.files import FILE_LIST, staged_folder
from utils.padim.model import Padim

as_user = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads and writes any mode")


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


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A model fitted on textures and its config; a small MVTec-layout category (40 px)."""
    folder = tmp_path_factory.mktemp("ctx")
    settings = settings_from_dict({"image_size": 64, "output_dimension": 24, "device": "cpu", "batch_size": 8})
    model = Padim(settings).fit(to_batch(smooth_textures(6, 64, seed=1)), progress=False).save(folder / "m.pt")
    category = generate_mvtec(str(folder / "cat"), seed=0, size=40, n_train=12, n_good=4, n_per_defect=3)
    return types.SimpleNamespace(config=str(write(folder / "c.yaml", yaml.safe_dump(settings.to_dict()))), model=model,
                                 category=category)


# ---------------------------------------------------------------- builders of bad states: (tmp, ctx) -> argv
def config_text(text: str | bytes, command: str = "fit", mode: int = 0o644):
    def make(tmp, ctx):
        config = write(tmp / "config.yaml", text.replace("{tmp}", str(tmp)) if isinstance(text, str) else text)
        config.chmod(mode)
        return [command, "--config", str(config)] + (["--output", str(tmp / "m.pt")] if command == "fit" else [])
    return make


def unwritable_results(command):
    def make(tmp, ctx):
        (tmp / "locked").mkdir(mode=0o555)
        if command == "predict":
            return predict(ctx, images(tmp / "in"), tmp / "locked" / "o")
        text = open(ctx.config).read().replace("results_dir: results", f"results_dir: {tmp}/locked/r")
        return [command, "--config", str(write(tmp / "c.yaml", text))]
    return make


def earlier_output(then):
    """``tmp/out``, a predict's output of the images in ``tmp/in/sub`` (12 for "image 10 fails"); then ``then``."""
    def make(tmp, ctx):
        images(tmp / "in" / "sub", 12 if then == "image 10 fails" else 1)
        argv = predict(ctx, tmp / "in", tmp / "out")
        assert main(argv + ["--quiet"]) == 0
        if then == "damaged file list":
            write(tmp / "out" / FILE_LIST, "[" * 200_000 + "]" * 200_000)
        elif then == "image 10 fails":  # batch_size 8: the first batch was written when image 10 fails
            write(tmp / "in" / "sub" / "i10.png", "not an image")
        elif then == "input inside":  # the swap would delete the output's own heat-maps given as input
            return predict(ctx, tmp / "out" / "sub", tmp / "out")
        return argv
    return make


def predict_after(prepare, source="in", output="o"):
    """predict of ``tmp/source`` into ``tmp/output`` once ``tmp/in`` holds an image and ``prepare(tmp)`` ran."""
    def build(tmp, ctx):
        images(tmp / "in")
        prepare(tmp)
        return predict(ctx, tmp / source, tmp / output)
    return build


def written_folder(tmp, model=None) -> str:
    """``tmp/r``, a folder ``evaluate`` wrote as a whole: metrics.csv, and ``model`` as model.pt."""
    with staged_folder(tmp / "r", "evaluate") as folder:
        write(Path(folder) / "metrics.csv")
        if model:
            shutil.copy(model, Path(folder) / "model.pt")
    return str(tmp / "r")


def fit_into_a_written_folder(how):
    """``fit`` whose model would land in ``tmp/r``: its results_dir inside, or --output a link to its model.pt."""
    def make(tmp, ctx):
        if how == "results_dir":
            return ["fit", "--config", str(write(tmp / "c.yaml", f"results_dir: {written_folder(tmp)}/res\n"))]
        (tmp / "link.pt").symlink_to(Path(written_folder(tmp, ctx.model)) / "model.pt")
        return ["fit", "--config", ctx.config, "--output", str(tmp / "link.pt")]
    return make


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


BAD = [  # (builder, a fragment of the one error line; {tmp} is the test's folder)
    (config_text(b"seed: 1\nbatch_size: 3\nseed: 2\n"), "key `seed` is written twice (lines 1 and 3)"),
    (config_text(b"data:\n\tformat: demo\n"), "a tab character is used for indentation"),
    (config_text(b"results_dir: r\xe9sultats\n"), "is not UTF-8 text (byte 0xe9"),
    (config_text(b"seed: 18446744073709551616\n"), "`seed` is 18446744073709551616"),
    (config_text("seed: " + "[" * 3000 + "]" * 3000 + "\n"), "nested too deeply"),
    (config_text("? [a, b]\n: 1\n"), "not valid YAML: a key is a list or mapping (line 1)"),  # YAML complex keys
    (config_text("seed: 1\n? {a: 1}\n: 1\n"), "not valid YAML: a key is a list or mapping (line 2)"),
    (config_text("results_dir: ~nosuchuser_zz/x\n"), "`results_dir` is '~nosuchuser_zz/x': no user 'nosuchuser_zz'"),
    (config_text("data:\n  format: study\n  root: /nonexistent/fast_ixi\n"), "data.zip"),
    (lambda tmp, ctx: ["fit", "--config", str(tmp)], "config file is a folder, not a file"),
    pytest.param(config_text("seed: 0\n", mode=0), "cannot read config file", marks=as_user),
    (lambda tmp, ctx: [], "required: command"),
    (lambda tmp, ctx: ["predict", "--config", "x.yaml"], "required: --model, --input, --output"),
    (lambda tmp, ctx: ["fit", "--bogus"], "unrecognized arguments: --bogus"),
    (config_text("results_dir: {tmp}/config.yaml\ndata:\n  root: {tmp}/demo\n", "evaluate"), "{tmp}/config.yaml"),
    (lambda tmp, ctx: ["fit", "--config", ctx.config, "--output", str(tmp)], "is a folder; give the model file"),
    (lambda tmp, ctx: ["fit", "--config", ctx.config, "--output", f"{tmp}/models/"], "is a folder; give the model file"),
    (lambda tmp, ctx: ["fit", "--config", mvtec_config(tmp, ctx.category), "--output", str(write(tmp / "notes.txt"))],
     "is not a model file"),
    (torch_checkpoint_as_fit_output, "is not a model file"),
    (config_text("seed: 1\n---\nseed: 2\n"), "a second document (after `---`) follows the first"),
    (config_text("data:\n  root: {tmp}/config.yaml\n"), "demo set to {tmp}/config.yaml: exists and is not a folder"),
    *[pytest.param(unwritable_results(name), "{tmp}/locked", marks=as_user) for name in ["fit", "evaluate", "predict"]],
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), write(tmp / "out")), "{tmp}/out"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), tmp / "in" / "out"), "is inside --input"),
    (predict_after(lambda tmp: (tmp / "via").symlink_to(tmp / "in", target_is_directory=True), "via", "in/out"),
     "is inside --input"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), write(tmp / "docs" / "thesis.tex").parent),
     "holds files that no predict run wrote (thesis.tex)"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), write(tmp / "mine" / "scores.csv").parent), "(scores.csv)"),
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), write(tmp / "repo" / ".git" / "HEAD").parent.parent),
     "holds files that no predict run wrote (.git)"),  # a user's hidden files are theirs
    (lambda tmp, ctx: predict(ctx, images(tmp / "in"), written_folder(tmp)), "that no predict run wrote (metrics.csv)"),
    (lambda tmp, ctx: ["fit", "--config", ctx.config, "--output", f"{written_folder(tmp)}/model.pt"],
     "is inside {tmp}/r, which another run wrote as a whole"),  # the metrics beside it would describe another model
    (fit_into_a_written_folder("link"), "link.pt: is inside {tmp}/r, which another run wrote as a whole"),
    (fit_into_a_written_folder("results_dir"), "{tmp}/r/res: is inside {tmp}/r, which another run wrote"),
    (earlier_output("damaged file list"), "holds files that no predict run wrote"),
    (earlier_output("input inside"), "is inside --output"),
    (earlier_output("image 10 fails"), "{tmp}/in/sub/i10.png"),
    (predict_after(lambda tmp: Image.fromarray(np.full((64, 64), np.inf, np.float32)).save(tmp / "in" / "inf.tif")),
     "inf.tif holds NaN or Inf values"),
    # ctx.model knows no training files: nothing reads the pipe before the reader
    (predict_after(lambda tmp: write(tmp / "in" / "x.png", "not an image")),
     "cannot read image {tmp}/in/x.png: not an image file, or damaged"),
    (predict_after(lambda tmp: os.mkfifo(tmp / "in" / "x.png")),
     "is not a regular file (a broken link, device or pipe): {tmp}/in/x.png"),
    (truncated_jpegs_read_in_workers, "error: cannot read image {tmp}/cat/train/good"),
    (changed_byte_in_the_model, "fails its checksum"),
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


@pytest.mark.parametrize("exc, code, line, debug", [
    (ValueError("size\nwith a second line"), 2, "error: ValueError: size (set PADIM_DEBUG=1", True),
    (KeyError("missing"), 2, "error: KeyError: 'missing' (set PADIM_DEBUG=1", True),
    (RecursionError(), 2, "error: RecursionError: (no message)", True),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), 2, "error: /x: No such file or directory",
     False),
    (KeyboardInterrupt(), 130, "interrupted: no partial files were written", False),
])
def test_every_exception_ends_as_one_line_and_its_exit_code(exc, code, line, debug, capsys, monkeypatch):
    """PADIM_DEBUG=1 shows the traceback of an unexpected error; a file-system error or Ctrl-C stays one line."""
    command = mock.Mock(side_effect=exc)
    monkeypatch.delenv("PADIM_DEBUG", raising=False)
    assert run_command(command) == code
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1
    monkeypatch.setenv("PADIM_DEBUG", "1")
    with pytest.raises(type(exc)) if debug else contextlib.nullcontext():
        assert run_command(command) == code


# ---------------------------------------------------------------- interruptions and reruns
_SCRIPT = """
import os, runpy, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
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
{during}
sys.argv = [{module!r}, *{argv!r}]
runpy.run_module({module!r}, run_name="__main__")
"""

_IMPORT = """
class SignalOnTorch:  # the signal arrives exactly while torch is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            interrupt()
sys.meta_path.insert(0, SignalOnTorch())
"""

_WRITE = """
import torch
import utils.padim.model_file as model_file
from conftest import FailingStream
real_save = torch.save  # the signal arrives in the middle of the archive, as a Ctrl-C during a long write does
model_file.torch.save = lambda payload, stream: real_save(payload, FailingStream(stream, 1 << 20, interrupt))
"""


@pytest.mark.parametrize("during, module, signum", [
    (_IMPORT, "utils", signal.SIGINT), (_IMPORT, "utils", signal.SIGTERM),
    ("from utils.padim.model import Padim\ninterrupt_at(Padim, 'accumulate', 1)", "utils", signal.SIGINT),
    (_WRITE, "utils", signal.SIGINT), (_WRITE, "utils", signal.SIGTERM),
    ("from PIL import Image\ninterrupt_at(Image.Image, 'save', 20)", "utils.demo_data", signal.SIGTERM),
], ids=["import-int", "import-term", "fit-int", "write-int", "write-term", "demo-term"])
def test_an_interruption_exits_130_and_leaves_nothing(ctx, tmp_path, during, module, signum):
    # output_dimension: all 176 channels, a model file of several MB: the write is interrupted in its middle
    config = mvtec_config(tmp_path, ctx.category, output_dimension=None)
    argv = [str(tmp_path / "demo")] if module == "utils.demo_data" else ["fit", "--config", config, "--output",
                                                                          str(tmp_path / "m.pt"), "--quiet"]
    code = _SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), signum=int(signum), during=during,
                          module=module, argv=argv)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and "interrupted" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "enforce fail" not in done.stderr
    assert list(snapshot(tmp_path)) == ["config.yaml"]  # no model, no demo set, no hidden temporary
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # importing utils changed nothing in this process


def test_reruns_replace_the_run_folder_keep_the_model_they_read_and_never_a_users_file(ctx, tmp_path, capsys):
    """evaluate; evaluate --model <run>/model.pt --no-save-model; again with a Finder file in the folder; again with
    a user's file in it: refused, nothing changed."""
    argv = ["evaluate", "--config", mvtec_config(tmp_path, ctx.category), "--no-figures"]
    assert cli(argv, capsys)[0] == 0
    (run,) = (tmp_path / "results").iterdir()
    assert cli(argv + ["--model", str(run / "model.pt"), "--no-save-model"], capsys)[0] == 0
    assert (run / "model.pt").is_file()  # read by the run: kept, and listed as the folder's
    (run / ".DS_Store").touch()  # the system's, not a user's file
    assert cli(argv, capsys)[0] == 0
    assert sorted(os.listdir(run)) == [FILE_LIST, "config.yaml", "metrics.csv", "metrics.md", "model.pt",
                                       "timings.json"]
    write(run / "notes" / "mine.txt")
    before = snapshot(tmp_path)
    code, err, _ = cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "holds files that no evaluate run wrote (notes)" in err and snapshot(tmp_path) == before


def test_a_new_predict_replaces_the_earlier_output_as_a_whole_behind_a_link(ctx, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    assert cli(predict(ctx, images(tmp_path / "a", 3), link), capsys)[0] == 0
    code, _, out = cli(predict(ctx, os.path.join(images(tmp_path / "b"), "i00.png"), link), capsys)  # one image file
    assert code == 0 and "1 image scored" in out and link.is_symlink()
    assert sorted(os.listdir(link)) == [FILE_LIST, "i00_anomaly.npy", "i00_heatmap.png", "scores.csv"]
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


def test_a_problem_of_several_files_is_one_warning_line_per_kind_naming_one_and_the_count(ctx, tmp_path, capsys):
    """Two damaged training images, two gradient masks (16 levels from 15 to 255 inside: half the range drops some)."""
    root = shutil.copytree(ctx.category, tmp_path / "cat")
    victims = {"warning: mask ": sorted(root.glob("ground_truth/*/*_mask.png"))[:2],
               "warning: skipping": sorted(root.glob("train/good/*.png"))[:2]}
    for path in victims["warning: mask "]:
        inside = np.asarray(Image.open(path)) > 0
        levels = 15 + 16 * (np.indices(inside.shape).sum(0) % 16)
        Image.fromarray(np.where(inside, levels, 0).astype(np.uint8)).save(path)
    for path in victims["warning: skipping"]:
        truncated_jpeg(path)
    config = mvtec_config(tmp_path, root, data={"skip_bad_images": True})
    code, err, out = cli(["evaluate", "--config", config, "--no-figures", "--no-save-model"], capsys)
    assert code == 0 and out, err
    lines = sorted(err.splitlines())
    assert len(lines) == 2 and all(line.endswith("(and 1 more like it)") for line in lines), err
    for line, (start, paths) in zip(lines, victims.items()):
        assert line.startswith(start) and any(str(path) in line for path in paths)


@pytest.mark.parametrize("rank", ["1", "3"])
def test_predict_under_torchrun_runs_on_rank_0_alone(ctx, tmp_path, monkeypatch, capsys, rank):
    """The other ranks exit 0 before any check; rank 0 predicts (here it finds no model file)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    argv = predict(ctx, tmp_path, tmp_path / "out", model=tmp_path / "none.pt")
    assert cli(argv, capsys) == (0, "", "") and not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    code, err, _ = cli(argv, capsys)
    assert code == 2 and "none.pt" in err
