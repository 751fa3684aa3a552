"""The metrics step of an evaluation (``Run.compute_metrics``) on its own, as ``evaluate``
gets there: load, fit, score (not timed), then the metrics table ``--reps`` times (the median is
reported), and each group's protocols (A) and (B) as two calls and as one (``pixel_metrics_ab``,
where the tree has it). Nothing is written but the JSON line it prints.

    python bench/metrics_step.py configs/fast_ixi_study.yaml --root ../shared/fast_ixi
    python bench/metrics_step.py CONFIG --root DIR --results /tmp/x   # any config, e.g. an MVTec-layout set
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def protocol_seconds(groups) -> dict:
    """Seconds of protocols (A) and (B) over every group but the normal one, as two calls and as one."""
    from utils.evaluation import metrics as M

    two = one = 0.0
    for name, group in groups.items():
        if not group.anomalous:
            continue
        row_maps = group.maps[group.row_image]
        began = time.perf_counter()
        M.pixel_metrics(row_maps, group.row_masks), M.pixel_metrics(row_maps, group.row_masks, group.row_heads)
        two += time.perf_counter() - began
        if hasattr(M, "pixel_metrics_ab"):
            began = time.perf_counter()
            M.pixel_metrics_ab(row_maps, group.row_masks, group.row_heads)
            one += time.perf_counter() - began
    return {"a_and_b_two_calls_s": round(two, 3), "a_and_b_one_call_s": round(one, 3) if one else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--root", help="data.root (the config's otherwise)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "metrics_step"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import torch

    from utils.config import load_config
    from utils.evaluation import Run

    torch.set_num_threads(os.cpu_count())
    settings = load_config(args.config, results_dir=args.results)
    if args.root:
        settings = settings.replace(data={"root": os.path.abspath(args.root)})
    run = Run(settings)
    run.load_data()
    run.fit(progress=False)
    run.score(progress=False)
    seconds = []
    for _ in range(args.reps):
        run.compute_metrics()
        seconds.append(run.timings["metrics_s"])
    groups = run.units.groups  # image formats: one GroupScores per test group
    result = {"git": common.git_revision(), "config": args.config, "load_average": common.load_average(),
              "test_images": sum(g.n_images for g in groups.values()), "groups": len(groups),
              "pixels_per_image": int(next(iter(groups.values())).maps[0].size),
              "metrics_s": statistics.median(seconds), "metrics_runs_s": seconds,
              "fit_s": run.timings.get("fit_s"), "score_s": run.timings.get("score_s"), **protocol_seconds(groups)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
