"""Shared by bench/run.py and bench/anomalib_worker.py (which runs in anomalib's own venv):
image lists, the one image loader every measurement uses, peak memory, result output."""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DATA_ROOT = os.environ.get("PADIM_BENCH_DATA", os.path.join(ROOT, "..", "shared", "fast_ixi"))
TRAIN_SPLITS = ("ixi_normal_train", "normal_train")
#: Test images for scoring speed and the correctness guard: these groups, distinct images, in order.
TEST_SPLITS = ("normal_test", "mass", "lesions", "edema", "posttreatment", "enlarged_ventricles", "artefacts")
IMAGE_SIZE = 128
BATCH = 32
RESULT_TAG = "BENCH_RESULT "


def split_paths(split: str) -> list[str]:
    with open(os.path.join(DATA_ROOT, "data", "splits", f"{split}.csv"), newline="") as handle:
        return [os.path.normpath(os.path.join(DATA_ROOT, row["filename"])) for row in csv.DictReader(handle)]


def train_paths(n: int) -> list[str]:
    paths = [p for split in TRAIN_SPLITS for p in split_paths(split)]
    if n > len(paths):
        raise SystemExit(f"asked for {n} training images, the study has {len(paths)}")
    return paths[:n]


def test_paths(n: int) -> list[str]:
    seen: dict[str, None] = {}
    for split in TEST_SPLITS:
        for path in split_paths(split):
            seen.setdefault(path)
    return list(seen)[:n]


def load_batch(paths):
    """The single image path of every measurement: decode + preprocess (utils.data.preprocess) + stack."""
    import torch

    from utils.config import settings_from_dict
    from utils.data.preprocess import prepare, read_image

    settings = settings_from_dict({"image_size": IMAGE_SIZE})
    return torch.stack([prepare(read_image(p, settings.data.color), settings).image for p in paths])


def batches(paths, timings: dict | None = None):
    """Yield preprocessed batches of ``BATCH`` images, decoding as it goes; adds decode time to
    ``timings['load_s']``."""
    for start in range(0, len(paths), BATCH):
        began = time.perf_counter()
        batch = load_batch(paths[start : start + BATCH])
        if timings is not None:
            timings["load_s"] = timings.get("load_s", 0.0) + time.perf_counter() - began
        yield batch


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (ru_maxrss, kB on Linux), in GB (1e9 bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def current_rss_gb() -> float:
    """Resident memory of this process now (/proc/self/statm), in GB."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError):
        return float("nan")


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def emit(result: dict) -> None:
    result.setdefault("peak_rss_gb", round(peak_rss_gb(), 3))
    print(RESULT_TAG + json.dumps(result), flush=True)


def machine_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as handle:
            memory = round(int(handle.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "memory_gb": memory, "platform": platform.platform()}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except OSError:
        return "unknown"
