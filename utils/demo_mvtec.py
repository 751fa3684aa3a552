"""``python -m utils.demo_mvtec DIR [--seed N]``: write a synthetic category in the MVTec AD
layout (:mod:`utils.data.demo.mvtec`)."""

import os

from .boundary import OneLineParser, run_command
from .data.demo.mvtec import generate_mvtec


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m utils.demo_mvtec", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.exit(2, f"error: --seed must be >= 0, got {args.seed}\n")
    if os.path.exists(args.root):
        parser.exit(2, f"error: {args.root} exists already; give a new folder\n")

    def command() -> int:
        generate_mvtec(args.root, seed=args.seed)
        print(f"wrote an MVTec-layout category to {args.root} (data.format: mvtec, data.root: {args.root})")
        return 0

    return run_command(command)


if __name__ == "__main__":
    raise SystemExit(main())
