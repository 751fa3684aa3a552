"""Write the small synthetic brain-MRI demo set (study layout) to DIR, or another synthetic set.

``python -m utils.demo_data DIR [--seed N] [--force]``: the demo set of brain slices
(:mod:`utils.data.demo.brains`); ``--nifti DIR``: the NIfTI volume demo (:mod:`utils.data.demo.nifti`);
``--mvtec DIR``: a colour category in the MVTec AD layout (:mod:`utils.data.demo.mvtec`)."""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .boundary import OneLineParser, run_command
from .data.demo.brains import generate_demo
from .data.demo.mvtec import generate_mvtec
from .data.demo.nifti import generate_nifti_demo


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog="python -m utils.demo_data", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("directory", metavar="DIR", nargs="?", help="folder to create (absent or empty)")
    where.add_argument("--nifti", metavar="DIR", help="write the NIfTI volume demo (utils.data.demo.nifti) to DIR instead")
    where.add_argument("--mvtec", metavar="DIR",
                       help="write a synthetic MVTec AD category (utils.data.demo.mvtec) to DIR instead")
    parser.add_argument("--seed", type=int, default=0, help="random seed (integer >= 0, default 0)")
    parser.add_argument("--force", action="store_true",
                        help="replace the folder if it holds a demo set generated here and nothing else")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")

    def command() -> int:
        try:
            print(_generate(args))
        except FileExistsError as exc:  # the one place that knows --force
            hint = "" if args.force else " (--force replaces a set generated there, and nothing else)"
            raise FileExistsError(exc.errno, exc.strerror + hint, exc.filename) from None
        return 0

    return run_command(command)  # one ``error:`` line, exit 2; Ctrl-C or SIGTERM, exit 130, nothing partial left


def _generate(args: argparse.Namespace) -> str:
    """Write the set ``args`` names; returns what was written."""
    if args.nifti is not None:
        generate_nifti_demo(args.nifti, seed=args.seed, overwrite=args.force)
        return f"NIfTI demo written to {args.nifti}: manifest {os.path.join(args.nifti, 'volumes.csv')}"
    if args.mvtec is not None:
        generate_mvtec(args.mvtec, seed=args.seed, overwrite=args.force)
        return f"MVTec-layout category written to {args.mvtec} (data.format: mvtec, data.root: {args.mvtec})"
    generate_demo(args.directory, seed=args.seed, overwrite=args.force)
    return _written_counts(args.directory)


def _written_counts(directory: str) -> str:
    with open(os.path.join(directory, "data", "demo.json"), encoding="utf-8") as handle:
        counts = json.load(handle)["counts"]
    return f"demo set written to {directory}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if not k.endswith(("_ann", "_neg")))


if __name__ == "__main__":
    sys.exit(main())
