"""Benchmark of the PaDiM fit and scoring against the floor (the backbone alone), a naive
per-position reference, and anomalib's PaDiM: on the study's real images (../shared/fast_ixi).

    python bench/run.py                      # full run (~10-15 min on 2 cores), writes bench/results.json
    python bench/run.py --quick              # smoke run (~2 min), writes bench/out/results-quick.json

Every measurement runs in a fresh subprocess (peak RSS is per process), with the same image
loader, batch size (32) and thread count. Figures that are compared in a ratio are measured side
by side: floor, fit, floor (the ratio uses the mean of the two floors around each fit), and per
scoring batch the backbone alone and the full scoring alternate. The correctness guard (fast
distances vs the naive float64 reference, relative error < 1e-4) is checked before any speed is
reported: if it fails, the JSON holds the guard and no speed figures, and the exit code is 1.

See bench/README.md for the JSON keys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
#: PaDiM dimension and weights per backbone (paper: resnet18 100, wide_resnet50_2 550; the
#: project's default for EfficientNet-Lite0 is 100). ResNets: random weights (no download here).
BACKBONE_SETUP = {
    "wide_resnet50_2": {"d": 550, "weights": "random"},
    "resnet18": {"d": 100, "weights": "random"},
    "efficientnet_lite0": {"d": 100, "weights": "imagenet"},
}
ANOMALIB_BACKBONES = ("wide_resnet50_2", "resnet18")
GUARD_THRESHOLD = 1e-4
EPSILON = 0.01


# =============================================================================== workers
def _settings(backbone: str, batch_size: int = common.BATCH):
    from utils.config import settings_from_dict

    setup = BACKBONE_SETUP[backbone]
    return settings_from_dict({
        "backbone": backbone, "weights": setup["weights"], "output_dimension": setup["d"], "image_size": common.IMAGE_SIZE,
        "device": "cpu", "batch_size": batch_size, "epsilon": EPSILON, "layers": [1, 2, 3],
    })


def _warm_up(embedder) -> None:
    import torch

    with torch.inference_mode():
        embedder(common.load_batch(common.test_paths(4)))


def backbone_pass(embedder, batch) -> None:
    """The network alone over ``batch``, as the embedder runs it (its micro-batches and memory format)."""
    for chunk in embedder.chunks(batch):
        embedder.extractor(chunk)


def worker_floor(spec: dict) -> dict:
    """Image loading + the backbone alone (as ``Padim.fit`` runs it, :func:`backbone_pass`), over
    the same images and batches as a fit."""
    import torch

    from utils.padim.model import Padim

    embedder = Padim(_settings(spec["backbone"])).embedder
    _warm_up(embedder)
    timings = {"load_s": 0.0}
    forward = 0.0
    with torch.inference_mode():
        for batch in common.batches(common.train_paths(spec["n"]), timings):
            began = time.perf_counter()
            backbone_pass(embedder, batch)
            forward += time.perf_counter() - began
    result = {"floor_s": timings["load_s"] + forward, "load_s": timings["load_s"], "forward_s": forward}
    return {k: round(v, 3) for k, v in result.items()}


def worker_fit(spec: dict) -> dict:
    """``Padim.fit`` from image files (load + backbone + statistics + inverse); then, optionally,
    scoring speed against the backbone alone on the same batches, and the test distances."""
    import numpy as np
    import torch

    from utils.padim.model import Padim

    model = Padim(_settings(spec["backbone"]))
    _warm_up(model.embedder)
    base = common.current_rss_gb()
    timings = {"load_s": 0.0}
    began = time.perf_counter()
    model.fit(common.batches(common.train_paths(spec["n"]), timings), progress=False)
    fit_s = time.perf_counter() - began
    result = {"fit_s": round(fit_s, 3), "load_s": round(timings["load_s"], 3), "fit_peak_rss_gb": round(common.peak_rss_gb(), 3),
              "base_rss_gb": round(base, 3)}
    if spec.get("score_n"):
        images = common.load_batch(common.test_paths(spec["score_n"]))
        result.update(_scoring_speed(model, images, spec.get("score_reps", 2)))
        if spec.get("distances_out"):
            with torch.inference_mode():
                np.save(spec["distances_out"], np.concatenate([model.distances(b).double().numpy() for b in images.split(common.BATCH)]))
    return result


def _scoring_speed(model, images, reps: int) -> dict:
    """ms per image of ``Padim.score`` and of the backbone alone, alternating per batch (their order too)."""
    import torch

    batches = list(images.split(common.BATCH))
    seconds = {"floor": 0.0, "score": 0.0}
    with torch.inference_mode():
        model.score(batches[0], progress=False)  # warm-up of the scoring path
        for rep in range(reps):
            for batch in batches:
                for what in ("floor", "score") if rep % 2 == 0 else ("score", "floor"):
                    began = time.perf_counter()
                    if what == "floor":
                        backbone_pass(model.embedder, batch)
                    else:
                        model.score(batch, progress=False)
                    seconds[what] += time.perf_counter() - began
    count = len(images) * reps
    return {"score_ms_per_image": round(1000 * seconds["score"] / count, 2),
            "score_floor_ms_per_image": round(1000 * seconds["floor"] / count, 2)}


#: Micro-batches and memory formats of the sweep (item 1 of issue 27): images per network pass at 128 px.
SWEEP_MICRO_BATCHES = (4, 8, 16, 32)


def worker_sweep(spec: dict) -> dict:
    """The embedding (backbone + channel selection + upsampling) of ``spec["images"]`` test images,
    ms per image, for every micro-batch of ``SWEEP_MICRO_BATCHES`` in both memory formats: every
    repetition runs each configuration once (a warm-up round first), and each one's median is reported."""
    import torch

    from utils.padim.backbones import cpu_forward
    from utils.padim.model import Padim

    embedder = Padim(_settings(spec["backbone"])).embedder
    default = embedder.cpu_plan
    images = common.load_batch(common.test_paths(spec["images"]))
    seconds: dict = {(fmt, size): [] for fmt in ("contiguous", "channels_last") for size in SWEEP_MICRO_BATCHES}
    with torch.inference_mode():
        for rep in range(spec["reps"] + 1):
            for fmt, size in seconds if rep % 2 else reversed(seconds):
                embedder.cpu_plan = cpu_forward(size, fmt == "channels_last")
                embedder(images[:1])  # moves the weights to the format, untimed
                began = time.perf_counter()
                embedder(images)
                if rep:
                    seconds[(fmt, size)].append(time.perf_counter() - began)
    table = {fmt: {str(size): round(1000 * statistics.median(seconds[(fmt, size)]) / len(images), 2) for size in SWEEP_MICRO_BATCHES}
             for fmt in ("contiguous", "channels_last")}
    chosen = {"micro_batch": default.micro_batch((common.IMAGE_SIZE, common.IMAGE_SIZE)),
              "memory_format": "channels_last" if default.channels_last else "contiguous"}
    return {"backbone": spec["backbone"], "images": len(images), "reps": spec["reps"], "ms_per_image": table, "chosen": chosen}


def worker_naive(spec: dict) -> dict:
    """The study's method: every embedding kept, ``np.cov`` and ``np.linalg.inv`` per position
    (float64), then SciPy's ``mahalanobis`` per image and position, bilinear upsampling and
    ``scipy.ndimage.gaussian_filter``. Same backbone, weights, channels and images as ours."""
    import numpy as np
    import torch

    from utils.padim.model import Padim

    model = Padim(_settings(spec["backbone"]))
    _warm_up(model.embedder)
    d, grid = model.settings.kept_channels, model.settings.feature_size
    positions = grid * grid
    base = common.current_rss_gb()
    paths = common.train_paths(spec["n"])
    timings = {"load_s": 0.0}
    began = time.perf_counter()
    embeddings = np.empty((len(paths), d, positions), dtype=np.float32)
    row = 0
    with torch.inference_mode():
        for batch in common.batches(paths, timings):
            embeddings[row : row + len(batch)] = model.embed(batch).flatten(2).numpy()
            row += len(batch)
    collect_s = time.perf_counter() - began
    began = time.perf_counter()
    mean = embeddings.mean(axis=0, dtype=np.float64)  # (d, P)
    precision = np.empty((positions, d, d))
    identity = np.eye(d)
    for p in range(positions):
        covariance = np.cov(embeddings[:, :, p], rowvar=False) + EPSILON * identity
        precision[p] = np.linalg.inv(covariance)
    statistics_s = time.perf_counter() - began
    result = {
        "fit_s": round(collect_s + statistics_s, 3), "collect_s": round(collect_s, 3), "statistics_s": round(statistics_s, 3),
        "load_s": round(timings["load_s"], 3), "fit_peak_rss_gb": round(common.peak_rss_gb(), 3), "base_rss_gb": round(base, 3),
    }
    del embeddings
    if spec.get("score_n"):
        images = common.load_batch(common.test_paths(spec["score_n"]))
        seconds, distances = _naive_scoring(model, images, mean, precision)
        result["score_ms_per_image"] = round(1000 * seconds / len(images), 2)
        if spec.get("distances_out"):
            np.save(spec["distances_out"], distances)
    return result


def _naive_scoring(model, images, mean, precision):
    """The study's scoring: seconds for ``images`` and their ``(N, H, W)`` distances."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter
    from scipy.spatial.distance import mahalanobis

    grid = model.settings.feature_size
    all_distances, seconds = [], 0.0
    with torch.inference_mode():
        for batch in images.split(common.BATCH):
            began = time.perf_counter()
            embedding = model.embed(batch).flatten(2).double().numpy()  # (N, d, P)
            distances = np.empty((len(batch), grid * grid))
            for i in range(len(batch)):
                for p in range(grid * grid):
                    distances[i, p] = mahalanobis(embedding[i, :, p], mean[:, p], precision[p])
            maps = F.interpolate(torch.from_numpy(distances.reshape(-1, 1, grid, grid)), size=(common.IMAGE_SIZE,) * 2,
                                 mode="bilinear", align_corners=False)[:, 0].numpy()
            maps = np.stack([gaussian_filter(m, model.settings.blur_sigma, mode="mirror") for m in maps])
            maps.reshape(len(batch), -1).max(axis=1)
            seconds += time.perf_counter() - began
            all_distances.append(distances.reshape(-1, grid, grid))
    return seconds, np.concatenate(all_distances)


def _e2e_settings(results_dir: str):
    from utils.config import settings_from_dict

    return settings_from_dict({
        "backbone": "efficientnet_lite0", "weights": "imagenet", "output_dimension": 100, "image_size": common.IMAGE_SIZE,
        "device": "cpu", "batch_size": common.BATCH, "results_dir": results_dir,
        "data": {"format": "study", "root": common.DATA_ROOT},
    })


def _e2e_image_lists(settings) -> list[list[str]]:
    """The images the evaluation pushes through the network, as it batches them: the training
    set, the validation set, then every test group (each distinct image once per group)."""
    from utils.data import load_data

    bundle = load_data(settings)
    lists = [bundle.train.paths]
    if bundle.val is not None:
        lists.append(bundle.val.paths)
    for group in bundle.test.values():
        lists.append(list(dict.fromkeys(group.paths)))
    return lists


def worker_e2e(spec: dict) -> dict:
    from utils.evaluation import run_evaluation
    from utils.evaluation.plotting import save_figure

    settings = _e2e_settings(spec["results_dir"])
    began = time.perf_counter()
    evaluation = run_evaluation(settings, progress=False, figures=False)  # figures are for people: timed apart
    total = time.perf_counter() - began
    timings = {k: v for k, v in evaluation.timings.items() if isinstance(v, (int, float))}
    began = time.perf_counter()
    figures = evaluation.make_figures()
    for name, figure in figures.items():  # rendered and written as `evaluate` writes them
        save_figure(figure, os.path.join(spec["results_dir"], "figures", f"{name}.png"))
    figures_s = time.perf_counter() - began
    return {"e2e_s": round(total, 3), "evaluation_timings": timings, "groups": len(evaluation.units.groups),
            "figures": len(figures), "figures_s": round(figures_s, 3)}


def worker_e2e_floor(spec: dict) -> dict:
    """Image decoding + backbone forward over every image the evaluation processes, run as the
    evaluation runs it (:func:`backbone_pass` per batch), training and test images alike."""
    import torch

    from utils.padim.model import Padim

    settings = _e2e_settings(spec["results_dir"])
    lists = _e2e_image_lists(settings)
    embedder = Padim(settings).embedder
    _warm_up(embedder)
    timings = {"load_s": 0.0}
    forward, images = 0.0, 0
    with torch.inference_mode():
        for paths in lists:
            for batch in common.batches(paths, timings):
                began = time.perf_counter()
                backbone_pass(embedder, batch)
                forward += time.perf_counter() - began
                images += len(batch)
    return {"floor_s": round(timings["load_s"] + forward, 3), "load_s": round(timings["load_s"], 3),
            "forward_s": round(forward, 3), "images": images}


WORKERS = {"sweep": worker_sweep, "floor": worker_floor, "fit": worker_fit, "naive": worker_naive, "e2e": worker_e2e, "e2e_floor": worker_e2e_floor}


# =============================================================================== driver
class Runner:
    def __init__(self, args):
        self.args = args
        self.log = []

    def _run(self, command: list[str], label: str) -> dict:
        env = dict(os.environ)
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(self.args.threads)
        load_before = common.load_average()
        began = time.perf_counter()
        process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=common.ROOT)
        wall = time.perf_counter() - began
        lines = [line for line in process.stdout.splitlines() if line.startswith(common.RESULT_TAG)]
        entry = {"label": label, "wall_s": round(wall, 1), "load_before": load_before, "load_after": common.load_average()}
        if process.returncode != 0 or not lines:
            tail = (process.stderr or process.stdout).strip().splitlines()[-8:]
            entry["error"] = " | ".join(tail)[-1500:]
            self.log.append(entry)
            print(f"  {label}: FAILED ({wall:.0f} s): {entry['error'][-400:]}", flush=True)
            return {"error": entry["error"]}
        result = json.loads(lines[-1][len(common.RESULT_TAG):])
        result["load_average"] = load_before
        entry["result"] = result
        self.log.append(entry)
        shown = {k: v for k, v in result.items() if not isinstance(v, (dict, list)) or k == "shipped_inverse_check"}
        print(f"  {label} ({wall:.0f} s, load {load_before[0] if load_before else '?'}): {json.dumps(shown)}", flush=True)
        return result

    def ours(self, worker: str, spec: dict, label: str) -> dict:
        spec = {"threads": self.args.threads, **spec}
        return self._run([sys.executable, os.path.abspath(__file__), "--worker", worker, "--spec", json.dumps(spec)], label)

    def anomalib(self, spec: dict, label: str) -> dict:
        spec = {"threads": self.args.threads, **spec}
        return self._run([self.args.anomalib_python, os.path.join(BENCH, "anomalib_worker.py"), json.dumps(spec)], label)


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _over_neighbouring_floors(runs: list, floors: list) -> list[float]:
    """Run ``i`` (measured between floors ``i`` and ``i + 1``) over the mean of those floors; missing values skipped."""
    ratios = []
    for i, run in enumerate(runs):
        around = [f for f in floors[i : i + 2] if f]
        if run and around:
            ratios.append(run / statistics.mean(around))
    return ratios


def _ratio(a, b, digits=3):
    return round(a / b, digits) if a is not None and b else None


def _guard(fast_path: str, naive_path: str) -> dict:
    import numpy as np

    fast, naive = np.load(fast_path), np.load(naive_path)
    if fast.shape != naive.shape:
        return {"passed": False, "error": f"shapes differ: {fast.shape} vs {naive.shape}"}
    relative = np.abs(fast - naive) / np.maximum(np.abs(naive), 1e-12)
    worst = float(relative.max())
    return {
        "distances": int(relative.size), "max_rel_err": worst, "median_rel_err": float(np.median(relative)),
        "naive_distance_range": [round(float(naive.min()), 3), round(float(naive.max()), 3)],
        "passed": bool(worst < GUARD_THRESHOLD),
    }


def _versions(anomalib_python: str | None) -> dict:
    import numpy
    import scipy
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
                "blas": "MKL" if torch.backends.mkl.is_available() else "other"}
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if anomalib_python:
        probe = subprocess.run([anomalib_python, "-c", "import importlib.metadata as m; print(m.version('anomalib'), m.version('timm'))"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            versions["anomalib"], versions["timm"] = probe.stdout.split()
    return versions


def _header(args) -> dict:
    """What every results file starts with: when, where, with what, how."""
    return {
        "schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": common.git_revision(),
        "command": " ".join([os.path.relpath(sys.argv[0], common.ROOT)] + sys.argv[1:]), "quick": args.quick,
        "machine": common.machine_info(), "threads": args.threads, "versions": _versions(args.anomalib_python),
        "load_average": {"start": common.load_average()},
        "settings": {"image_size": common.IMAGE_SIZE, "batch_size": common.BATCH, "layers": [1, 2, 3], "n": args.n,
                     "n_small": args.n_small, "score_images": args.score_n, "reps": args.reps, "epsilon": EPSILON,
                     "data": os.path.normpath(common.DATA_ROOT)},
        "guard": {"threshold": GUARD_THRESHOLD}, "backbones": {},
    }


def _measure_sweep(runner: Runner, args) -> dict:
    """The CPU forward sweep (``worker_sweep``) for every backbone of ``BACKBONE_SETUP``."""
    print(f"sweep: micro-batches {SWEEP_MICRO_BATCHES} x (contiguous, channels_last), {args.sweep_images} images", flush=True)
    sweep = {}
    for backbone in BACKBONE_SETUP:
        result = runner.ours("sweep", {"backbone": backbone, "images": args.sweep_images, "reps": args.sweep_reps}, f"sweep {backbone}")
        if "error" not in result:
            sweep[backbone] = _sweep_entry(result)
    return sweep


def _sweep_entry(result: dict) -> dict:
    cells = [(ms, fmt, int(size)) for fmt, row in result["ms_per_image"].items() for size, ms in row.items()]
    best_ms, best_fmt, best_size = min(cells)
    chosen = result["chosen"]
    chosen_ms = result["ms_per_image"][chosen["memory_format"]].get(str(chosen["micro_batch"]))
    return {"ms_per_image": result["ms_per_image"], "chosen": chosen, "chosen_ms_per_image": chosen_ms,
            "best": {"micro_batch": best_size, "memory_format": best_fmt, "ms_per_image": best_ms},
            "chosen_over_best": _ratio(chosen_ms, best_ms), "load_average": result.get("load_average")}


def _measure_backbone(runner: Runner, args, backbone: str) -> dict:
    """Floors around every fit, a small fit, the naive reference and anomalib, for one backbone."""
    setup = BACKBONE_SETUP[backbone]
    print(f"{backbone} (d = {setup['d']}, {setup['weights']} weights), N = {args.n}", flush=True)
    out = lambda what: os.path.join(args.out_dir, f"{backbone}_{what}_distances.npy")  # noqa: E731
    m = {"floors": [], "fits": [], "fast_distances": out("fast"), "naive_distances": out("naive")}
    base = {"backbone": backbone, "n": args.n}
    m["floors"].append(runner.ours("floor", base, f"floor N={args.n}"))
    for rep in range(args.reps):
        spec = {**base, "score_n": args.score_n, "distances_out": out("fast")} if rep == 0 else base
        m["fits"].append(runner.ours("fit", spec, f"fit N={args.n}"))
        m["floors"].append(runner.ours("floor", base, f"floor N={args.n}"))
    m["fit_small"] = runner.ours("fit", {"backbone": backbone, "n": args.n_small}, f"fit N={args.n_small}")
    if not args.no_naive:
        m["naive"] = runner.ours("naive", {**base, "score_n": args.score_n, "distances_out": out("naive")}, f"naive N={args.n}")
    if args.anomalib_python and backbone in ANOMALIB_BACKBONES:
        m["anomalib"] = runner.anomalib({**base, "d": setup["d"], "score_n": args.score_n, "distances_out": out("anomalib"),
                                         "check_shipped_inverse": True, "inverse": args.anomalib_inverse}, f"anomalib N={args.n}")
        m["anomalib_small"] = runner.anomalib({"backbone": backbone, "n": args.n_small, "d": setup["d"],
                                               "inverse": args.anomalib_inverse}, f"anomalib N={args.n_small}")
        m["anomalib_distances"] = out("anomalib")
    return m


def _measure_end_to_end(runner: Runner, args) -> dict:
    """``run_evaluation`` runs, each between two floor runs."""
    print("end to end: run_evaluation, efficientnet_lite0, 128 px, all test groups", flush=True)
    spec = {"results_dir": os.path.join(args.out_dir, "e2e_results")}
    try:
        import utils.evaluation  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"utils.evaluation is not importable: {exc}"}
    e2e = {"floors": [runner.ours("e2e_floor", spec, "e2e floor")], "runs": []}
    for _ in range(args.reps):
        e2e["runs"].append(runner.ours("e2e", spec, "e2e run_evaluation"))
        e2e["floors"].append(runner.ours("e2e_floor", spec, "e2e floor"))
    return e2e


def _check_guard(measured: dict) -> dict:
    """Fast distances against the naive float64 reference, per backbone (anomalib's for information)."""
    guard = {"threshold": GUARD_THRESHOLD}
    for backbone, m in measured.items():
        if os.path.isfile(m["fast_distances"]) and os.path.isfile(m["naive_distances"]) and "error" not in m.get("naive", {}):
            g = _guard(m["fast_distances"], m["naive_distances"])
            if m.get("anomalib_distances") and os.path.isfile(m["anomalib_distances"]):
                g["anomalib_max_rel_err_info"] = _guard(m["anomalib_distances"], m["naive_distances"]).get("max_rel_err")  # anomalib adds 1e-5 to epsilon
        else:
            g = {"passed": False, "error": "no naive reference or no fast distances (run without --no-naive)"}
        guard[backbone] = g
    guard["passed"] = all(g["passed"] for name, g in guard.items() if isinstance(g, dict))
    return guard


def _backbone_entry(args, backbone: str, m: dict) -> dict:
    """The results of one backbone: floor, fit, ratios, memory, scoring, naive and anomalib."""
    setup = BACKBONE_SETUP[backbone]
    floors = [f.get("floor_s") for f in m["floors"]]
    fits = [f.get("fit_s") for f in m["fits"]]
    ratios = _over_neighbouring_floors(fits, floors)
    first = m["fits"][0] if m["fits"] else {}
    entry = {
        "d": setup["d"], "weights": setup["weights"], "n": args.n,
        "floor": {"runs_s": floors, "floor_s": _median(floors), "load_s": m["floors"][0].get("load_s"),
                  "forward_s": m["floors"][0].get("forward_s")},
        "fit": {"runs_s": fits, "fit_s": _median(fits), "peak_rss_gb": _median([f.get("fit_peak_rss_gb") for f in m["fits"]]),
                "load_s": first.get("load_s"), "base_rss_gb": first.get("base_rss_gb")},
        "fit_over_floor": round(statistics.median(ratios), 3) if ratios else None,
        "fit_over_floor_runs": [round(r, 3) for r in ratios],
        "fit_small": {"n": args.n_small, "fit_s": m["fit_small"].get("fit_s"), "peak_rss_gb": m["fit_small"].get("fit_peak_rss_gb")},
        "score": {"ms_per_image": first.get("score_ms_per_image"), "floor_ms_per_image": first.get("score_floor_ms_per_image"),
                  "ratio": _ratio(first.get("score_ms_per_image"), first.get("score_floor_ms_per_image"))},
    }
    big, small = entry["fit"]["peak_rss_gb"], entry["fit_small"]["peak_rss_gb"]
    entry["memory_growth"] = round(big / small - 1, 4) if big and small else None
    if "naive" in m and "error" not in m["naive"]:
        naive = m["naive"]
        entry["naive"] = {k: naive.get(k) for k in ("fit_s", "collect_s", "statistics_s", "fit_peak_rss_gb", "base_rss_gb", "score_ms_per_image")}
        entry["vs_naive"] = {"fit_speedup": _ratio(naive.get("fit_s"), entry["fit"]["fit_s"], 2),
                             "memory_ratio": _ratio(naive.get("fit_peak_rss_gb"), big, 2),
                             "score_speedup": _ratio(naive.get("score_ms_per_image"), entry["score"]["ms_per_image"], 2)}
    if "anomalib" in m:
        entry["anomalib"], entry["vs_anomalib"] = _anomalib_entry(args, m["anomalib"], m.get("anomalib_small", {}), entry)
    return entry


def _anomalib_entry(args, a: dict, a_small: dict, ours: dict) -> tuple[dict, dict]:
    anomalib = {
        "fit_s": a.get("fit_s"), "collect_s": a.get("collect_s"), "gaussian_fit_s": a.get("gaussian_fit_s"),
        "peak_rss_gb": a.get("fit_peak_rss_gb"), "base_rss_gb": a.get("base_rss_gb"), "score_ms_per_image": a.get("score_ms_per_image"),
        "small": {"n": args.n_small, "fit_s": a_small.get("fit_s"), "peak_rss_gb": a_small.get("fit_peak_rss_gb")},
        "backbone_max_abs_diff": a.get("backbone_max_abs_diff"), "inverse": a.get("inverse"),
        "shipped_inverse_check": a.get("shipped_inverse_check"), "error": a.get("error"),
    }
    above = lambda r: r["peak_rss_gb"] - r["base_rss_gb"] if r.get("peak_rss_gb") and r.get("base_rss_gb") else None  # noqa: E731
    versus = {"fit_speedup": _ratio(a.get("fit_s"), ours["fit"]["fit_s"]),
              "memory_ratio": _ratio(a.get("fit_peak_rss_gb"), ours["fit"]["peak_rss_gb"]),
              "memory_above_base_ratio": _ratio(above(anomalib), above(ours["fit"]), 2),
              "score_speedup": _ratio(a.get("score_ms_per_image"), ours["score"]["ms_per_image"], 2)}
    return anomalib, versus


def _end_to_end_entry(e2e: dict) -> dict:
    if "skipped" in e2e:
        return e2e
    failed = [run for run in e2e["runs"] if "error" in run]
    if failed:
        return {"skipped": f"run_evaluation failed: {failed[0]['error'][-500:]}"}
    floors = [f.get("floor_s") for f in e2e["floors"]]
    runs = [run["e2e_s"] for run in e2e["runs"]]
    ratios = _over_neighbouring_floors(runs, floors)
    median_run = e2e["runs"][sorted(range(len(runs)), key=runs.__getitem__)[len(runs) // 2]]  # odd counts
    timings = median_run.get("evaluation_timings") or {}
    return {
        "e2e_s": _median(runs), "e2e_runs_s": runs, "floor_runs_s": floors, "floor_s": _median([f for f in floors if f]),
        "images": e2e["floors"][0].get("images"), "evaluation_timings": timings,
        "metrics_share": _ratio(timings.get("metrics_s"), median_run["e2e_s"]),
        "ratio": round(statistics.median(ratios), 3) if ratios else None, "ratio_runs": [round(r, 3) for r in ratios],
        "figures": median_run.get("figures"), "figures_s": median_run.get("figures_s"),
        "figure_s": _ratio(median_run.get("figures_s"), median_run.get("figures")),
    }


def run_benchmark(args) -> int:
    os.makedirs(args.out_dir, exist_ok=True)
    runner = Runner(args)
    if args.anomalib_python and not os.path.isfile(args.anomalib_python):
        print(f"anomalib interpreter {args.anomalib_python} not found: anomalib is skipped (see bench/README.md)")
        args.anomalib_python = None
    results = _header(args)
    started = time.perf_counter()
    if not args.no_sweep:
        results["sweep"] = _measure_sweep(runner, args)
    measured = {backbone: _measure_backbone(runner, args, backbone) for backbone in args.backbones.split(",") if backbone}
    e2e = None if args.no_e2e else _measure_end_to_end(runner, args)
    results["load_average"]["end"] = common.load_average()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["guard"] = _check_guard(measured) if measured else {"threshold": GUARD_THRESHOLD, "passed": True}
    if not results["guard"]["passed"]:
        print("CORRECTNESS GUARD FAILED: no speed figures are reported", json.dumps(results["guard"], indent=1))
        results["runs"] = runner.log
        _write(results, args.output)
        return 1
    results["backbones"] = {backbone: _backbone_entry(args, backbone, m) for backbone, m in measured.items()}
    if e2e is not None:
        results["end_to_end"] = _end_to_end_entry(e2e)
    results["targets"] = _targets(results)
    results["runs"] = runner.log
    _write(results, args.output)
    print(table(results))
    return 0


def _targets(results: dict) -> list[dict]:
    """Every checked limit of issue 27, with its value and whether it is met (None: not measured)."""
    targets = []

    def add(key, text, value, limit, better="lower"):
        met = None if value is None else (value <= limit if better == "lower" else value >= limit)
        targets.append({"id": key, "target": text, "value": value, "limit": limit, "met": met})

    for name, b in results["backbones"].items():
        add(f"1.memory_growth.{name}", f"{name}: fit peak RSS, N={b['n']} vs N={b['fit_small']['n']}, relative growth < 0.10",
            b.get("memory_growth"), 0.10)
        if name == "efficientnet_lite0":
            add("2.fit_over_floor.efficientnet_lite0", "efficientnet_lite0: fit / floor (decoding + backbone) <= 1.15", b.get("fit_over_floor"), 1.15)
            add("2.fit_s.efficientnet_lite0", f"efficientnet_lite0: fit on {b['n']} images <= 3.5 s", b["fit"]["fit_s"], 3.5)
            add("2.score_ms.efficientnet_lite0", "efficientnet_lite0: scoring ms per image <= 4", b["score"]["ms_per_image"], 4.0)
        if name == "wide_resnet50_2":
            add("3.fit_over_floor.wide_resnet50_2", "wide_resnet50_2: fit / floor <= 1.3", b.get("fit_over_floor"), 1.3)
            add("3.score_over_backbone.wide_resnet50_2", "wide_resnet50_2: scoring / backbone alone <= 1.3", b["score"]["ratio"], 1.3)
            if "vs_anomalib" in b:
                va = b["vs_anomalib"]
                add("3.fit_speedup_vs_anomalib", "wide_resnet50_2: anomalib fit / our fit >= 2.2", va["fit_speedup"], 2.2, "higher")
                add("3.memory_vs_anomalib", "wide_resnet50_2: anomalib peak RSS / ours >= 2.5", va["memory_ratio"], 2.5, "higher")
                add("3.score_speedup_vs_anomalib", "wide_resnet50_2: anomalib scoring / ours >= 4.4", va["score_speedup"], 4.4, "higher")
    e2e = results.get("end_to_end")
    if e2e and "ratio" in e2e:
        add("4.end_to_end", "run_evaluation / (decoding + backbone over its images) <= 1.5", e2e["ratio"], 1.5)
        add("4.metrics_share", "metrics step / run_evaluation < 0.2", e2e.get("metrics_share"), 0.2)
    for name, g in results["guard"].items():
        if isinstance(g, dict):
            add(f"5.guard.{name}", f"{name}: max relative error of distances vs naive float64 < 1e-4", g.get("max_rel_err"), GUARD_THRESHOLD)
    return targets


def _write(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)
        handle.write("\n")
    print(f"wrote {path}")


def _shown(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def table(results: dict) -> str:
    """Markdown tables of the figures (the ones in bench/README.md and the README's Performance section)."""
    v, m = results["versions"], results["machine"]
    lines = [
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gb']} GB; {results['threads']} threads; "
        f"Python {v['python']}, torch {v['torch']} ({v['blas']}), numpy {v['numpy']}, scipy {v['scipy']}"
        + (f", anomalib {v['anomalib']} (timm {v.get('timm')})" if "anomalib" in v else "")
        + f"; load average {results['load_average']['start']} -> {results['load_average'].get('end')}; run {results.get('wall_s')} s",
        "",
    ]
    if results.get("sweep"):
        lines += sweep_table(results["sweep"]) + [""]
    if results.get("backbones"):
        lines += _backbone_rows(results) + [""] + _backbone_notes(results)
    lines += _end_to_end_line(results.get("end_to_end")) + [""] + _target_rows(results.get("targets", []))
    return "\n".join(lines)


def sweep_table(sweep: dict) -> list[str]:
    """ms per image of the embedding per micro-batch and memory format; the chosen cell in bold."""
    sizes = [str(size) for size in SWEEP_MICRO_BATCHES]
    lines = ["| backbone | " + " | ".join(f"{fmt} {size}" for fmt in ("NCHW", "channels_last") for size in sizes)
             + " | chosen / best |", "| --- |" + " ---: |" * (2 * len(sizes) + 1)]
    for name, entry in sweep.items():
        chosen = entry["chosen"]
        cells = []
        for fmt in ("contiguous", "channels_last"):
            for size in sizes:
                text = _shown(entry["ms_per_image"][fmt].get(size))
                cells.append(f"**{text}**" if (fmt, size) == (chosen["memory_format"], str(chosen["micro_batch"])) else text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_shown(entry.get('chosen_over_best'))} |")
    return lines


def _backbone_rows(results: dict) -> list[str]:
    v = results["versions"]
    lines = [
        "| backbone (d) | method | fit N s | floor N s | fit / floor | peak RSS N (GB) | peak RSS N_small (GB) | growth | score ms/img | backbone ms/img | score / backbone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    f = _shown
    for name, b in results["backbones"].items():
        lines.append(
            f"| {name} ({b['d']}) | ours | {f(b['fit']['fit_s'], '{:.1f}')} | {f(b['floor']['floor_s'], '{:.1f}')} | "
            f"{f(b['fit_over_floor'])} | {f(b['fit']['peak_rss_gb'])} | {f(b['fit_small']['peak_rss_gb'])} | "
            f"{f(b['memory_growth'], '{:+.1%}')} | {f(b['score']['ms_per_image'], '{:.1f}')} | "
            f"{f(b['score']['floor_ms_per_image'], '{:.1f}')} | {f(b['score']['ratio'])} |")
        if "anomalib" in b:
            a = b["anomalib"]
            growth = a["peak_rss_gb"] / a["small"]["peak_rss_gb"] - 1 if a.get("peak_rss_gb") and a["small"].get("peak_rss_gb") else None
            lines.append(
                f"| {name} ({b['d']}) | anomalib {v.get('anomalib', '')} | {f(a['fit_s'], '{:.1f}')} | | "
                f"{f(_ratio(a['fit_s'], b['floor']['floor_s']))} | {f(a['peak_rss_gb'])} | {f(a['small']['peak_rss_gb'])} | "
                f"{f(growth, '{:+.1%}')} | {f(a['score_ms_per_image'], '{:.1f}')} | | |")
        if "naive" in b:
            n = b["naive"]
            lines.append(
                f"| {name} ({b['d']}) | naive (np.cov, inv, SciPy) | {f(n['fit_s'], '{:.1f}')} | | "
                f"{f(_ratio(n['fit_s'], b['floor']['floor_s']))} | {f(n['fit_peak_rss_gb'])} | | | {f(n['score_ms_per_image'], '{:.1f}')} | | |")
    return lines


def _backbone_notes(results: dict) -> list[str]:
    f, lines = _shown, []
    for name, b in results["backbones"].items():
        extra = []
        if "vs_anomalib" in b:
            va = b["vs_anomalib"]
            extra.append(f"vs anomalib: fit {f(va['fit_speedup'])}x faster, {f(va['memory_ratio'], '{:.3f}')}x less peak memory "
                         f"({f(va.get('memory_above_base_ratio'))}x less above each process's baseline of interpreter, "
                         f"libraries and model: ours {f(b['fit'].get('base_rss_gb'))} GB, anomalib {f(b['anomalib'].get('base_rss_gb'))} GB), "
                         f"scoring {f(va['score_speedup'])}x faster")
        if "vs_naive" in b:
            vn = b["vs_naive"]
            extra.append(f"vs naive: fit {f(vn['fit_speedup'])}x, memory {f(vn['memory_ratio'])}x, scoring {f(vn['score_speedup'])}x")
        g = results["guard"].get(name, {})
        extra.append(f"guard: max rel. error {g.get('max_rel_err', float('nan')):.1e} over {g.get('distances')} distances")
        lines.append(f"- {name}: " + "; ".join(extra))
    return lines


def _end_to_end_line(e2e: dict | None) -> list[str]:
    if not e2e:
        return []
    if "skipped" in e2e:
        return [f"- end to end: not measured ({e2e['skipped'][:300]})"]
    t = e2e.get("evaluation_timings") or {}
    parts = ", ".join(f"{k[:-2]} {t[k]:.1f} s" for k in ("load_data_s", "fit_s", "score_s", "metrics_s", "figures_s", "save_s") if k in t)
    return [f"- end to end (efficientnet_lite0, run_evaluation over {e2e['images']} image passes, median of "
            f"{len(e2e['e2e_runs_s'])} runs): {e2e['e2e_s']:.1f} s vs decoding + backbone {e2e['floor_s']:.1f} s = "
            f"{e2e['ratio']:.2f}x, each run against its two neighbouring floors: {e2e['ratio_runs']} ({parts}); "
            f"without figures: its {e2e.get('figures')} figures took {e2e.get('figures_s')} s apart ({e2e.get('figure_s')} s each)"]


def _target_rows(targets: list[dict]) -> list[str]:
    lines = ["| target | value | limit | met |", "| --- | --- | --- | --- |"]
    for t in targets:
        value = t["value"]
        shown = "–" if value is None else (f"{value:.1e}" if abs(value) < 1e-2 and value != 0 else f"{value:.3g}")
        lines.append(f"| {t['target']} | {shown} | {t['limit']} | {'yes' if t['met'] else ('–' if t['met'] is None else 'NO')} |")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="training images for the main fit (default 711, all; --quick 128)")
    parser.add_argument("--n-small", type=int, default=None, help="training images of the second fit, for memory growth (default 100; --quick 64)")
    parser.add_argument("--backbones", default=None,
                        help="comma-separated: wide_resnet50_2, resnet18, efficientnet_lite0 (default efficientnet_lite0,wide_resnet50_2; --quick efficientnet_lite0,resnet18)")
    parser.add_argument("--score-n", type=int, default=None, help="test images for scoring speed and the guard (default 64; --quick 32)")
    parser.add_argument("--reps", type=int, default=None,
                        help="fits per backbone and end-to-end runs, each between two floor runs; ratios are medians (default 3; --quick 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every measurement (default: all CPUs)")
    parser.add_argument("--quick", action="store_true", help="fast smoke mode: small N, small backbones, no end-to-end run")
    parser.add_argument("--output", default=None, help="JSON file (default bench/results.json; --quick bench/out/results-quick.json)")
    parser.add_argument("--out-dir", default=os.path.join(BENCH, "out"), help="scratch outputs (git-ignored)")
    parser.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON", "/tmp/anomalib-venv/bin/python"),
                        help="interpreter of the venv with anomalib (bench/requirements-anomalib.txt)")
    parser.add_argument("--anomalib-inverse", choices=("threaded", "batched"), default="threaded",
                        help="Cholesky inverse patched into anomalib (see bench/anomalib_worker.py)")
    parser.add_argument("--no-anomalib", action="store_true")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference (and so the guard: exit code 1)")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="only the CPU forward sweep (micro-batches x memory formats, every backbone)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweep-images", type=int, default=32, help="test images per configuration of the sweep (default 32)")
    parser.add_argument("--sweep-reps", type=int, default=None, help="repetitions of each configuration of the sweep (default 5; --quick 1)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        common.set_threads(spec["threads"])
        common.emit(WORKERS[args.worker](spec))
        return 0
    quick = args.quick
    args.n = args.n or (128 if quick else 711)
    args.n_small = args.n_small or (64 if quick else 100)
    args.score_n = args.score_n or (32 if quick else 64)
    args.reps = args.reps or (1 if quick else 3)
    args.backbones = args.backbones or ("efficientnet_lite0,resnet18" if quick else "efficientnet_lite0,wide_resnet50_2")
    args.sweep_reps = args.sweep_reps or (1 if quick else 5)
    if args.no_anomalib:
        args.anomalib_python = None
    if args.sweep:  # the sweep alone: no fits, no end-to-end run
        args.backbones, args.no_e2e, args.no_sweep = "", True, False
    default_output = "out/sweep.json" if args.sweep else "out/results-quick.json" if quick else "results.json"
    args.output = args.output or os.path.join(BENCH, default_output)
    if quick:
        args.no_e2e = True
    unknown = [b for b in args.backbones.split(",") if b and b not in BACKBONE_SETUP]
    if unknown:
        parser.error(f"unknown backbone {unknown[0]!r}; choose from {', '.join(BACKBONE_SETUP)}")
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
