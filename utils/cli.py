"""Command line: ``python -m utils fit|evaluate|predict --config config.yaml ...``.

Every user error (bad config, data, model file) ends with ``error: <one line>`` and exit code 2,
never a traceback. Ctrl-C exits with 130 and leaves no partial model or results file.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Sequence

from .errors import ConfigError, PadimError
from .files import atomic_writer, staged_folder, writable_folder, write_atomic


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (exit 2), as every other error is."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m utils", description="PaDiM anomaly detection")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", default="config.yaml", help="YAML settings file (default: config.yaml)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    fit = commands.add_parser("fit", help="fit PaDiM on the training images and save the model")
    common(fit)
    fit.add_argument("--output", help="model file to write (default: <results_dir>/<run-name>/model.pt)")

    evaluate = commands.add_parser("evaluate", help="fit (or load) and score every test group; write metrics")
    common(evaluate)
    evaluate.add_argument("--model", help="use this fitted model file instead of fitting")
    evaluate.add_argument("--no-figures", action="store_true", help="skip the figures (faster; metrics files only)")
    evaluate.add_argument("--no-save-model", action="store_true", help="do not write model.pt into the results folder")
    evaluate.add_argument("--no-maps", action="store_true", help="NIfTI volumes: do not write the anomaly map volumes")

    predict = commands.add_parser("predict", help="heat-maps and image scores for images, or NIfTI anomaly maps for volumes")
    common(predict)
    predict.add_argument("--model", required=True, help="fitted model file (from `fit`)")
    predict.add_argument("--input", required=True,
                         help="an image or NIfTI file, a folder of them (searched recursively), or a NIfTI manifest .csv")
    predict.add_argument("--output", required=True, help="folder for heat-maps and scores.csv (volumes: maps and volume_scores.csv)")
    return parser


def _fit(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import run_fit
    from .model_file import is_model_file

    settings = load_config(args.config)
    output = args.output
    if output == "":
        raise ConfigError("--output is empty; give the model file's path, e.g. model.pt")
    if output is not None:
        if os.path.isdir(output) or output.endswith(os.sep):
            raise ConfigError(f"--output {output} is a folder; give the model file's path, e.g. {os.path.join(output, 'model.pt')}")
        if os.path.lexists(output) and not is_model_file(output):
            raise ConfigError(f"--output {output} exists and is not a model file; give a new path (only a model file is replaced)")
        writable_folder(os.path.dirname(os.path.abspath(output)))
    else:
        _writable_results(settings.results_dir)  # the run's folder is named once the training files are known
    started = time.perf_counter()
    path = run_fit(settings, output, progress=not args.quiet)
    if path is not None:  # rank 0 (or the only process)
        print(f"model written to {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def _writable_results(folder: str) -> None:
    try:
        writable_folder(folder)
    except OSError as exc:
        where = "" if os.path.abspath(exc.filename) == os.path.abspath(folder) else f" ({exc.filename})"
        raise ConfigError(f"results_dir {folder}{where}: {exc.strerror}") from None


def _evaluate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluation import run_evaluation

    settings = load_config(args.config)
    _writable_results(settings.results_dir)  # before the work, not after it
    result = run_evaluation(settings, model_path=args.model, progress=not args.quiet,
                            figures=not args.no_figures, save_model=not args.no_save_model, maps=not args.no_maps)
    print(result.summary())
    return 0


def _input_files(source: str, output: str) -> list[str]:
    """``source`` itself when it is a file, else every image or NIfTI file below it; ``output``
    must lie outside a ``source`` folder (its heat-maps would be read as images by the next run)."""
    from .errors import DataError
    from .preprocess import IMAGE_SUFFIXES, NIFTI_SUFFIXES

    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise DataError(f"--input {source} is neither an image/NIfTI file nor a folder")
    if (os.path.realpath(output) + os.sep).startswith(os.path.realpath(source) + os.sep):  # links resolved
        raise DataError(f"--output {output} is inside --input {source}: the next run would score its heat-maps as "
                        "images; choose an output folder outside the input folder")
    files = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(source)
        for name in names
        if name.lower().endswith(IMAGE_SUFFIXES + NIFTI_SUFFIXES)
    )
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}) found in {source}")
    return files


#: Written last into every ``predict`` output: the list of its files. A folder is an earlier
#: output (replaced as a whole by the next run) only if it holds this list and nothing else.
PREDICT_LIST = "predict_files.json"


def _files_below(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def _output_folder(output: str) -> str:
    """The real path of ``output`` once it is absent, empty or an earlier predict output (its file
    list, :data:`PREDICT_LIST`, covers every file in it); never a folder that holds other files."""
    output = os.path.realpath(output)  # a link to the folder stays a link to the new outputs
    writable_folder(output)
    if not os.path.isdir(output) or not os.listdir(output):
        return output
    try:
        with open(os.path.join(output, PREDICT_LIST), encoding="utf-8") as handle:
            listed = set(json.load(handle)["files"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ConfigError(f"--output {output} holds other files (not an earlier predict output); give a new or empty folder") from None
    others = [f for f in _files_below(output) if f not in listed | {PREDICT_LIST}]
    if others:
        raise ConfigError(f"--output {output} holds files an earlier predict did not write ({others[0]}); give a new or empty folder")
    return output


def _predict(args: argparse.Namespace) -> int:
    """Every output is written into a folder beside ``--output`` and swapped in at the end
    (:func:`utils.files.staged_folder`): a failed or interrupted run leaves ``--output`` as it was,
    and an earlier run's files are replaced as a whole, never mixed with new ones."""
    from .config import load_config
    from .model import Padim
    from .preprocess import NIFTI_SUFFIXES

    settings = load_config(args.config)
    model = Padim.load(args.model, settings)
    files = _input_files(args.input, args.output)
    volumes = [f for f in files if f.lower().endswith(NIFTI_SUFFIXES + (".csv",))]  # a .csv: a NIfTI manifest
    images = [f for f in files if f not in volumes]
    with staged_folder(_output_folder(args.output)) as staging:
        done = []
        if volumes:
            done.append(_predict_volumes(model, volumes, staging, progress=not args.quiet))
        if images:
            done.append(_predict_images(model, images, args.input, staging, progress=not args.quiet))
        write_atomic(os.path.join(staging, PREDICT_LIST), json.dumps({"files": _files_below(staging)}, indent=1).encode())
    for line in done:
        print(f"{line} in {args.output}")
    return 0


def _predict_volumes(model, sources: list[str], output: str, progress: bool) -> str:
    """NIfTI maps and previews (:func:`utils.volumes.predict_volumes`) and ``volume_scores.csv``; returns what was done."""
    from .volumes import predict_entries, predict_volumes

    rows = predict_volumes(model, predict_entries(sources, model.settings.data.volume_index), output, progress=progress)
    _write_scores(os.path.join(output, "volume_scores.csv"), ["image", "score", "slice"],
                  [(r["image"], f"{r['score']:.6f}", r["slice"]) for r in rows])
    return f"{len(rows)} volumes scored; NIfTI maps, previews and volume_scores.csv"


def _write_scores(path: str, header: list[str], rows: list[tuple]) -> None:
    with atomic_writer(path) as stream, io.TextIOWrapper(stream, encoding="utf-8", newline="") as text:
        writer = csv.writer(text)
        writer.writerow(header)
        writer.writerows(rows)


def _predict_images(model, files: list[str], source: str, output: str, progress: bool) -> str:
    """One heat-map PNG per image and ``scores.csv`` (image, score) in ``output``; returns what was done."""
    import torch
    from tqdm.auto import tqdm

    from .errors import DataError
    from .plotting import save_heatmap
    from .preprocess import load_image

    base = source if os.path.isdir(source) else os.path.dirname(source)
    relative = [os.path.relpath(f, base) for f in files]
    names = [os.path.splitext(r)[0] + "_heatmap.png" for r in relative]
    clashes = sorted(name for name, count in collections.Counter(names).items() if count > 1)
    if clashes:
        raise DataError(f"two input images would write the same heat-map {clashes[0]} (same name, other suffix); rename one")
    targets = [os.path.join(output, name) for name in names]
    rows, size = [], model.settings.batch_size
    for start in tqdm(range(0, len(files), size), desc="predict", unit="batch", leave=False, disable=not progress):
        loaded = [load_image(f, model.settings) for f in files[start : start + size]]
        result = model.score(torch.stack([image for image, _ in loaded]), progress=False)
        for k, ((_, display), heat, score) in enumerate(zip(loaded, result.maps, result.scores)):
            save_heatmap(display.numpy(), heat, targets[start + k])
            rows.append((relative[start + k], float(score)))
    _write_scores(os.path.join(output, "scores.csv"), ["image", "score"], [(name, f"{score:.6f}") for name, score in rows])
    return f"{len(rows)} images scored (max score {max(r[1] for r in rows):.3f}); heat-maps and scores.csv"


COMMANDS = {"fit": _fit, "evaluate": _evaluate, "predict": _predict}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: temporary files are removed on the way out


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)  # not the source line that raised it


def run_command(command: Callable[[], int]) -> int:
    """Run ``command()`` as a command-line program (``python -m utils``, the demo generators).

    A user's error (:class:`PadimError`) or any file-system failure ends as one ``error:`` line
    naming the path, exit 2; Ctrl-C and SIGTERM end as one line, exit 130, with temporary files
    removed on the way out (:mod:`utils.files`). The SIGTERM handler lives only while the command runs.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        with warnings.catch_warnings():  # restores the warning printer afterwards
            warnings.showwarning = _one_line_warning
            return command()
    except PadimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # any file-system failure: the path and what is wrong, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial files were written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: COMMANDS[args.command](args))
