"""Command line: ``python -m utils fit|evaluate|predict --config config.yaml ...``.

Every user error (bad config, data, model file) ends with ``error: <one line>`` and exit code 2,
never a traceback; Ctrl-C exits with 130 and leaves no partial model or results file
(:mod:`utils.boundary`). Under ``torchrun`` ``fit`` and ``evaluate`` shard the fit (:mod:`utils.distributed`);
``predict`` runs on rank 0 alone, as one process would, and the other ranks exit 0 at once.
"""

import argparse
import os
import time
from typing import Sequence

from .boundary import DEBUG_ENV, OneLineParser, run_command
from .config import Settings, load_config
from .distributed import DistributedContext
from .errors import ConfigError
from .evaluation import run_evaluation, run_fit
from .files import refuse_inside_written, writable_folder
from .padim.model_file import is_model_file
from .predict import predict


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m utils", description="PaDiM anomaly detection",
                           epilog=f"Errors are one `error:` line (exit 2); set {DEBUG_ENV}=1 for the traceback of an "
                                  "unexpected one.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # the options of every command
    common.add_argument("--config", default="config.yaml", help="YAML settings file (default: config.yaml)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    fit = commands.add_parser("fit", parents=[common], help="fit PaDiM on the training images and save the model")
    fit.add_argument("--output", help="model file to write (default: <results_dir>/<run-name>/model.pt)")

    evaluate = commands.add_parser("evaluate", parents=[common],
                                   help="fit (or load) and score every test group; write metrics")
    evaluate.add_argument("--model", help="use this fitted model file instead of fitting")
    evaluate.add_argument("--no-figures", action="store_true", help="skip the figures (faster; metrics files only)")
    evaluate.add_argument("--no-save-model", action="store_true", help="do not write model.pt into the results folder")
    evaluate.add_argument("--no-maps", action="store_true", help="NIfTI volumes: do not write the anomaly map volumes")

    predict = commands.add_parser("predict", parents=[common],
                                  help="heat-maps and image scores for images, or NIfTI anomaly maps for volumes")
    predict.add_argument("--model", required=True, help="fitted model file (from `fit`)")
    predict.add_argument("--input", required=True,
                         help="an image or NIfTI file, a folder of them (searched recursively), or a NIfTI manifest .csv")
    predict.add_argument("--output", required=True,
                         help="folder for heat-maps, anomaly maps (<name>_anomaly.npy: float32, the image's own size) and "
                              "scores.csv (volumes: maps and volume_scores.csv)")
    return parser


def _fit(args: argparse.Namespace, settings: Settings) -> int:
    output = args.output
    if output == "":
        raise ConfigError("--output is empty; give the model file's path, e.g. model.pt")
    if output is not None:
        if os.path.isdir(output) or output.endswith(os.sep):
            raise ConfigError(f"--output {output} is a folder; give the model file's path, e.g. {os.path.join(output, 'model.pt')}")
        if os.path.lexists(output) and not is_model_file(output):
            raise ConfigError(f"--output {output} exists and is not a model file; give a new path (only a model file is replaced)")
        refuse_inside_written(output)  # a run's model.pt: the metrics beside it would describe another model
        writable_folder(os.path.dirname(os.path.abspath(output)))
    else:
        _writable_results(settings.results_dir)  # the run's folder is named once the training files are known
    started = time.perf_counter()
    path = run_fit(settings, output, progress=not args.quiet)
    if path is not None:  # rank 0 (or the only process)
        print(f"model written to {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def _writable_results(folder: str) -> None:
    refuse_inside_written(folder, folder=True)  # fit writes <folder>/<run>/model.pt
    try:
        writable_folder(folder)
    except OSError as exc:
        where = "" if os.path.abspath(exc.filename) == os.path.abspath(folder) else f" ({exc.filename})"
        raise ConfigError(f"results_dir {folder}{where}: {exc.strerror}") from None


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    _writable_results(settings.results_dir)  # before the work, not after it
    run = run_evaluation(settings, model_path=args.model, progress=not args.quiet,
                         figures=not args.no_figures, save_model=not args.no_save_model, maps=not args.no_maps)
    if run is not None:  # rank 0 (or the only process)
        print(run.summary())
    return 0


def _predict(args: argparse.Namespace, settings: Settings) -> int:
    if not DistributedContext.from_settings(settings).is_main:  # under torchrun rank 0 predicts, as one process
        return 0
    for line in predict(settings, args.model, args.input, args.output, progress=not args.quiet):
        print(f"{line} in {args.output}")
    return 0


COMMANDS = {"fit": _fit, "evaluate": _evaluate, "predict": _predict}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: COMMANDS[args.command](args, load_config(args.config)))
