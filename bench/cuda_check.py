"""The CUDA path, checked and timed on the study's real images: agreement with the CPU path,
fit and scoring against the backbone alone, GPU memory, and the end-to-end evaluation.

    python bench/cuda_check.py                       # needs a CUDA device; writes bench/results-cuda.json
    python bench/cuda_check.py --device cpu --quick  # smoke run of the script itself, anywhere

Everything runs in this one process, one measurement after another (no CPU-side memory figures:
see bench/run.py for those). Every GPU timing is taken between ``torch.cuda.synchronize()`` calls.
Sections:

- ``agreement``: the same fit and distances on CPU and on the device, per backbone; relative
  differences of mean, Cholesky factors and distances; a second device fit gives the run-to-run spread,
  and one with cuDNN's TF32 convolutions switched off shows what TF32 contributes.
- ``speed``: per backbone, image loading + backbone alone (the floor) vs ``Padim.fit`` over the
  same N images; per image, the backbone alone, + Mahalanobis distances, and the whole scoring
  (+ maps, copied to the CPU); peak device memory of the fits.
- ``evaluation``: ``run_evaluation`` of configs/fast_ixi.yaml and configs/fast_ixi_study.yaml on
  the device and on CPU (no figures, no model file): metric means side by side, phase timings.

On a machine without the study's data beside the project, point ``PADIM_BENCH_DATA`` at it.

See bench/README.md for the JSON keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import run  # noqa: E402  (bench/run.py: the same PaDiM settings per backbone)

METRIC_COLUMNS = ("A_auroc", "A_ap", "B_auroc", "C_auroc")  # means over every pathology group


def _settings(backbone: str, device: str):
    """bench/run.py's settings for ``backbone`` (dimension, weights, size, batch, epsilon) on ``device``."""
    return run._settings(backbone).replace(device=device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative(a, b) -> float:
    """max |a - b| / max |b|, in float64 on CPU."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _fit(backbone: str, device: str, paths: list[str]):
    from utils.padim.model import Padim

    model = Padim(_settings(backbone, device))
    model.fit(common.batches(paths), progress=False)
    return model


def agreement(args, device) -> dict:
    """CPU vs device on the same images: the fit's mean and Cholesky factors, the test distances."""
    import torch

    train, test = common.train_paths(args.agree_n), common.load_batch(common.test_paths(args.score_n))
    results = {}
    for backbone in args.backbones:
        began = time.perf_counter()
        cpu = _fit(backbone, "cpu", train)
        gpu = _fit(backbone, str(device), train)
        again = _fit(backbone, str(device), train)
        with torch.inference_mode():
            d_cpu = torch.cat([cpu.distances(b) for b in test.split(common.BATCH)])
            d_gpu = torch.cat([gpu.distances(b) for b in test.split(common.BATCH)])
            d_again = torch.cat([again.distances(b) for b in test.split(common.BATCH)])
        row = {
            "mean_rel": _relative(gpu.mean, cpu.mean), "cholesky_rel": _relative(gpu.cholesky, cpu.cholesky),
            "distances_rel": _relative(d_gpu, d_cpu), "device_rerun_distances_rel": _relative(d_again, d_gpu),
        }
        if device.type == "cuda":
            allowed = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                strict = _fit(backbone, str(device), train)
                with torch.inference_mode():
                    d_strict = torch.cat([strict.distances(b) for b in test.split(common.BATCH)])
                row["no_tf32_distances_rel"] = _relative(d_strict, d_cpu)
            finally:
                torch.backends.cudnn.allow_tf32 = allowed
        row["seconds"] = time.perf_counter() - began
        results[backbone] = {k: float(f"{v:.3g}") for k, v in row.items()}
        print(f"agreement {backbone}: {results[backbone]}", flush=True)
    return {"train_images": len(train), "test_images": len(test), "backbones": results}


def speed(args, device) -> dict:
    """Floor (load + backbone alone, batches of 32) vs ``Padim.fit``, alternating; scoring vs the
    backbone alone per batch; peak device memory of a fit at two training-set sizes."""
    import torch

    from utils.padim.model import Padim

    results = {}
    test_batches = list(common.load_batch(common.test_paths(args.score_n)).split(common.BATCH))
    for backbone in args.backbones:
        model = Padim(_settings(backbone, str(device)))
        extractor = model.embedder.extractor
        with torch.inference_mode():  # warm-up: cuDNN algorithm choice, allocator
            model.fit(test_batches[:1], progress=False)
            extractor(test_batches[0].to(device))
        row = {}
        for n in (args.n_small, args.n):
            paths = common.train_paths(n)
            floors, fits = [], []
            for _ in range(args.reps):
                timings = {"load_s": 0.0}
                _sync(device)
                began = time.perf_counter()
                with torch.inference_mode():
                    for batch in common.batches(paths, timings):
                        extractor(batch.to(device, non_blocking=True))
                _sync(device)
                floors.append(time.perf_counter() - began)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                began = time.perf_counter()
                model.fit(common.batches(paths), progress=False)
                _sync(device)
                fits.append(time.perf_counter() - began)
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
            row[f"n{n}"] = {"floor_s": min(floors), "fit_s": min(fits), "fit_over_floor": min(fits) / min(floors),
                            "load_s": timings["load_s"], "fit_peak_device_gb": peak}
        seconds = {"floor": 0.0, "distances": 0.0, "score": 0.0}
        steps = {  # the backbone alone; + Mahalanobis; + maps (upsampling, blur), copied to the CPU
            "floor": lambda b: extractor(b.to(device)),
            "distances": model.distances,
            "score": lambda b: model.score(b, progress=False),
        }
        with torch.inference_mode():
            model.score(test_batches[0], progress=False)
            for rep in range(2 * args.reps):
                for batch in test_batches:
                    for what in (list(steps) if rep % 2 == 0 else list(steps)[::-1]):
                        _sync(device)
                        began = time.perf_counter()
                        steps[what](batch)
                        _sync(device)
                        seconds[what] += time.perf_counter() - began
        count = 2 * args.reps * sum(len(b) for b in test_batches)
        row.update(score_ms_per_image=1000 * seconds["score"] / count, score_floor_ms_per_image=1000 * seconds["floor"] / count,
                   distances_ms_per_image=1000 * seconds["distances"] / count, score_over_floor=seconds["score"] / seconds["floor"])
        first, last = row[f"n{args.n_small}"]["fit_peak_device_gb"], row[f"n{args.n}"]["fit_peak_device_gb"]
        row["device_memory_growth"] = (last - first) / first if first else None
        results[backbone] = _rounded(row)
        print(f"speed {backbone}: {json.dumps(results[backbone])}", flush=True)
    return results


def evaluation(args, device) -> dict:
    """``run_evaluation`` of each config on the device and on CPU, without figures or model file."""
    from utils.config import load_config
    from utils.evaluation import run_evaluation

    out = {}
    for config in args.configs:
        name = os.path.splitext(os.path.basename(config))[0]
        for where in dict.fromkeys((str(device), "cpu")):
            settings = load_config(config)
            settings = settings.replace(device=where, results_dir=os.path.join(args.out_dir, f"eval-{where}"),
                                        data={"root": common.DATA_ROOT})
            began = time.perf_counter()
            result = run_evaluation(settings, progress=False, figures=False, save_model=False)
            total = time.perf_counter() - began
            means = result.table.set_index("group").loc["mean"]
            timings = {k: v for k, v in result.timings.items() if k.endswith("_s")}
            out.setdefault(name, {})[where] = _rounded(
                {"total_s": total, **timings, **{f"mean_{k}": float(means[k]) for k in METRIC_COLUMNS}})
            print(f"evaluation {name} on {where}: {json.dumps(out[name][where])}", flush=True)
    return out


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device under test (default cuda)")
    parser.add_argument("--backbones", default="efficientnet_lite0,wide_resnet50_2")
    parser.add_argument("--n", type=int, default=711, help="training images of the speed fit (default 711)")
    parser.add_argument("--n-small", type=int, default=100, help="training images of the second fit, for memory growth")
    parser.add_argument("--agree-n", type=int, default=256, help="training images of the CPU-vs-device fits")
    parser.add_argument("--score-n", type=int, default=64, help="test images for distances and scoring speed")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--configs", default=",".join(os.path.join(common.ROOT, "configs", f"{c}.yaml") for c in ("fast_ixi", "fast_ixi_study")),
                        help="comma-separated configs for the evaluation section")
    parser.add_argument("--sections", default="agreement,speed,evaluation")
    parser.add_argument("--quick", action="store_true", help="small N, lite0 only: a smoke run of this script")
    parser.add_argument("--output", default=None, help="JSON file (default bench/results-cuda.json; --quick bench/out/)")
    parser.add_argument("--out-dir", default=os.path.join(common.ROOT, "bench", "out"))
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones, args.n, args.n_small, args.agree_n, args.score_n, args.reps = "efficientnet_lite0", 64, 32, 32, 32, 1
        args.configs = args.configs.split(",")[0]
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    output = args.output or (os.path.join(args.out_dir, "results-cuda-quick.json") if args.quick
                             else os.path.join(common.ROOT, "bench", "results-cuda.json"))
    os.makedirs(args.out_dir, exist_ok=True)

    import torch

    from utils.padim.features import resolve_device

    device = resolve_device(args.device)
    results = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "device": str(device),
               "torch": torch.__version__, "machine": common.machine_info(), "threads": torch.get_num_threads(),
               "git": common.git_revision(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1), "cuda": torch.version.cuda,
                          "cudnn": torch.backends.cudnn.version(), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                          "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    failed = False
    for section in [s.strip() for s in args.sections.split(",") if s.strip()]:
        try:
            results[section] = {"agreement": agreement, "speed": speed, "evaluation": evaluation}[section](args, device)
        except Exception:  # keep the other sections' figures
            failed = True
            results[section] = {"error": traceback.format_exc(limit=6)}
            print(results[section]["error"], file=sys.stderr, flush=True)
        with open(output, "w") as handle:
            json.dump(results, handle, indent=2)
    print(f"wrote {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
