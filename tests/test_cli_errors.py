"""Bad configs and bad file-system states end in one `error:` line and exit 2, before any work is done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from utils.cli import main

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("text, fragment", [
    (b"seed: 1\nbatch_size: 3\nseed: 2\n", "key `seed` is written twice (lines 1 and 3)"),
    (b"data:\n\tformat: demo\n", "a tab character is used for indentation; YAML needs spaces (line 2"),
    (b"results_dir: r\xe9sultats\n", "is not UTF-8 text (byte 0xe9"),
    (b"seed: 18446744073709551616\n", "`seed` is 18446744073709551616"),
])
def test_config_problems_are_named(tmp_path, capsys, text, fragment):
    config = tmp_path / "config.yaml"
    config.write_bytes(text)
    code, err = _run(["fit", "--config", str(config)], capsys)
    assert code == 2 and err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root reads files whatever their mode")
def test_unreadable_config(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\n")
    config.chmod(0)
    code, err = _run(["fit", "--config", str(config)], capsys)
    assert code == 2 and "cannot read config file" in err


def _config(tmp_path, **top):
    lines = [f"{key}: {value}" for key, value in top.items()]
    lines += ["image_size: 32", "output_dimension: 8", "data:", f"  root: {tmp_path / 'demo'}"]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_results_dir_that_is_a_file_fails_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    code, err = _run(["evaluate", "--config", _config(tmp_path, results_dir=blocker)], capsys)
    assert code == 2 and str(blocker) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "demo").exists(), "the check comes before the data are generated or read"


@pytest.mark.parametrize("suffix", ["", "/"])
def test_fit_output_that_is_a_folder(tmp_path, capsys, suffix):
    folder = tmp_path / "models"
    folder.mkdir()
    code, err = _run(["fit", "--config", _config(tmp_path), "--output", str(folder) + suffix], capsys)
    assert code == 2 and "is a folder" in err and "model.pt" in err


def test_predict_output_that_is_a_file(tmp_path, capsys, small_settings):
    import numpy as np
    from PIL import Image

    from conftest import smooth_textures, to_batch
    from utils.padim.model import Padim

    model = Padim(small_settings).fit(to_batch(smooth_textures(6, 64, seed=1)), progress=False).save(tmp_path / "m.pt")
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(small_settings.to_dict()))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    code, err = _run(["predict", "--config", str(config), "--model", model, "--input", str(image), "--output", str(blocker)], capsys)
    assert code == 2 and str(blocker) in err and len(err.splitlines()) == 1


def test_sigterm_is_a_clean_interruption(tmp_path):
    """SIGTERM while a command runs: exit 130, the interruption message, no traceback."""
    script = textwrap.dedent(f"""
        import os, signal, sys, threading
        sys.path.insert(0, {ROOT!r})
        import utils.cli as cli
        def slow(args, settings):
            threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
            threading.Event().wait(30)
        cli.COMMANDS["fit"] = slow
        sys.exit(cli.main(["fit", "--config", os.path.join({ROOT!r}, "config.yaml")]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # importing utils changed nothing here


@pytest.mark.parametrize("raised, code, line", [
    (lambda: (_ for _ in ()).throw(ValueError("batch size\nwith a second line")), 2, "error: ValueError: batch size (set PADIM_DEBUG=1"),
    (lambda: {}["missing"], 2, "error: KeyError: 'missing' (set PADIM_DEBUG=1"),
    (lambda: (_ for _ in ()).throw(RecursionError()), 2, "error: RecursionError: (no message)"),
    (lambda: open("/nonexistent/x"), 2, "error: /nonexistent/x: No such file or directory"),
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), 130, "interrupted: no partial files were written"),
])
def test_every_exception_ends_as_one_line_and_its_exit_code(raised, code, line, capsys, monkeypatch):
    from utils.boundary import run_command

    monkeypatch.delenv("PADIM_DEBUG", raising=False)
    assert run_command(raised) == code
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1


def test_padim_debug_shows_the_traceback_of_an_unexpected_error(monkeypatch):
    from utils.boundary import run_command

    monkeypatch.setenv("PADIM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 / 0)
