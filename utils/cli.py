"""Command line: ``python -m utils fit|evaluate|predict --config config.yaml ...``.

Every user error (bad config, data, model file) ends with ``error: <one line>`` and exit code 2,
never a traceback. Ctrl-C exits with 130 and leaves no partial model or results file.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from typing import Sequence

from .errors import PadimError
from .files import atomic_writer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils", description="PaDiM anomaly detection")
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

    predict = commands.add_parser("predict", help="heat-map PNGs and a CSV of image scores for a folder of images")
    common(predict)
    predict.add_argument("--model", required=True, help="fitted model file (from `fit`)")
    predict.add_argument("--input", required=True, help="folder of images (searched recursively)")
    predict.add_argument("--output", required=True, help="folder for heat-maps and scores.csv")
    return parser


def _fit(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import run_fit

    settings = load_config(args.config)
    if args.output:
        output = args.output
    else:
        from .evaluation import run_directory

        output = os.path.join(run_directory(settings), "model.pt")
    started = time.perf_counter()
    path = run_fit(settings, output, progress=not args.quiet)
    if path is not None:  # rank 0 (or the only process)
        print(f"model written to {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluation import run_evaluation

    settings = load_config(args.config)
    result = run_evaluation(settings, model_path=args.model, progress=not args.quiet,
                            figures=not args.no_figures, save_model=not args.no_save_model)
    print(result.summary())
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .config import load_config
    from .errors import DataError
    from .model import Padim
    from .plotting import save_heatmap
    from .preprocess import load_image

    settings = load_config(args.config)
    model = Padim.load(args.model, settings)
    if not os.path.isdir(args.input):
        raise DataError(f"input folder not found: {args.input}")
    files = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(args.input)
        for name in names
        if name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {args.input}")
    s = model.settings
    os.makedirs(args.output, exist_ok=True)
    rows = []
    for start in range(0, len(files), s.batch_size):
        chunk = files[start : start + s.batch_size]
        batch = torch.stack([load_image(f, s.image_size, s.data.resize, s.data.intensity) for f in chunk])
        result = model.score(batch, progress=False)
        for file, image, heat, score in zip(chunk, batch, result.maps, result.scores):
            relative = os.path.relpath(file, args.input)
            target = os.path.join(args.output, os.path.splitext(relative)[0] + "_heatmap.png")
            save_heatmap(image, heat, target)
            rows.append((relative, float(score)))
    table = os.path.join(args.output, "scores.csv")
    with atomic_writer(table) as stream, io.TextIOWrapper(stream, encoding="utf-8", newline="") as text:
        writer = csv.writer(text)
        writer.writerow(["image", "score"])
        writer.writerows((name, f"{score:.6f}") for name, score in rows)
    print(f"{len(rows)} images scored; heat-maps and scores.csv in {args.output} (max score {np.max([r[1] for r in rows]):.3f})")
    return 0


COMMANDS = {"fit": _fit, "evaluate": _evaluate, "predict": _predict}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PadimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial files were written", file=sys.stderr)
        return 130
