"""anomalib 2.7.0's PaDiM on the same images, backbone and weights as ours; run by bench/run.py
with the interpreter of a separate virtual environment that has anomalib (never the project's).

One measurement per process (peak RSS is per process):

    <venv>/bin/python bench/anomalib_worker.py '{"backbone": "wide_resnet50_2", "d": 550, "n": 711, ...}'

What is changed in anomalib, and nothing else:

- its ``torch.linalg.inv`` call (in ``MultiVariateGaussian.forward``) is replaced by a Cholesky
  inverse, because the batched LU inverse fails or returns wrong results here for >= 2 matrices
  of size >= ~272 with >= 2 threads (pytorch #142815). ``inverse: threaded`` (default) factorises
  chunks of 64 matrices on one Python thread per core with single-threaded LAPACK, as our fit does
  (MKL's multi-threaded Cholesky on 550 x 550 matrices is many times slower on a shared 2-core
  machine); ``inverse: batched`` is the plain ``cholesky_inverse(cholesky(A))`` one-call drop-in.
- its random-weight backbone gets the weights of ours (torchvision's initialisation under the
  same seed, loaded into timm's identical ResNet), and its random channel choice ``idx`` is set
  to ours, so both see identical embeddings (checked: ``backbone_max_abs_diff``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

warnings.filterwarnings("ignore")


#: Seconds the shipped batched-inverse check may take before it is reported as hung.
INVERSE_CHECK_LIMIT_S = 60
LAYER_NAMES = ("layer1", "layer2", "layer3")


def cholesky_inverse_threaded(matrices, chunk: int = 64):
    import torch

    out = torch.empty_like(matrices)
    starts = list(range(0, matrices.shape[0], chunk))
    threads = torch.get_num_threads()
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                if not starts:
                    return
                start = starts.pop(0)
            with torch.no_grad():
                factor = torch.linalg.cholesky(matrices[start : start + chunk])
                out[start : start + chunk] = torch.cholesky_inverse(factor)

    torch.set_num_threads(1)
    try:
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        torch.set_num_threads(threads)
    return out


def cholesky_inverse_batched(matrices):
    import torch

    return torch.cholesky_inverse(torch.linalg.cholesky(matrices))


def build_model(spec: dict):
    """anomalib's ``PadimModel`` with our backbone's weights and channel choice, and ``torch.linalg.inv``
    replaced (``spec["inverse"]``); returns the model and the shipped inverse."""
    import torch
    import torchvision
    from anomalib.models.image.padim.torch_model import PadimModel

    from utils.config import BACKBONES
    from utils.padim.features import random_channel_indices

    backbone, d, seed = spec["backbone"], spec["d"], spec.get("seed", 0)
    shipped_inverse = torch.linalg.inv
    torch.linalg.inv = cholesky_inverse_threaded if spec.get("inverse", "threaded") == "threaded" else cholesky_inverse_batched
    model = PadimModel(backbone=backbone, layers=list(LAYER_NAMES), pre_trained=False, n_features=d)
    # Our backbone's weights (torchvision initialisation under the seed, as utils.padim.features does).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = getattr(torchvision.models, backbone)(weights=None)
    missing, _ = model.feature_extractor.feature_extractor.load_state_dict(reference.state_dict(), strict=False)
    if missing:
        raise SystemExit(f"timm {backbone} lacks torchvision weights: {missing[:3]}")
    model.idx = random_channel_indices(BACKBONES[backbone].channels([1, 2, 3]), d, seed)
    return model, shipped_inverse


def backbone_difference(model, spec: dict, probe) -> float:
    """Largest difference between anomalib's features and those of our (NCHW, whole-batch) backbone on ``probe``."""
    import torch

    from utils.padim.backbones import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.get("seed", 0))
        ours = build_backbone(spec["backbone"], "random", [1, 2, 3])
    with torch.no_grad():
        theirs = model.feature_extractor(probe)
        return float(max((theirs[name] - mine).abs().max() for name, mine in zip(LAYER_NAMES, ours(probe))))


def fit(model, spec: dict) -> dict:
    """anomalib's training loop: every batch through the model, then its Gaussian fit."""
    import torch

    base = common.current_rss_gb()
    timings: dict = {}
    model.train()
    began = time.perf_counter()
    for batch in common.batches(common.train_paths(spec["n"]), timings):
        model(batch)
    timings["collect_s"] = time.perf_counter() - began
    began = time.perf_counter()
    with torch.no_grad():
        model.fit()
    timings["gaussian_fit_s"] = time.perf_counter() - began
    return {"fit_s": round(timings["collect_s"] + timings["gaussian_fit_s"], 3), "collect_s": round(timings["collect_s"], 3),
            "gaussian_fit_s": round(timings["gaussian_fit_s"], 3), "load_s": round(timings["load_s"], 3),
            "fit_peak_rss_gb": round(common.peak_rss_gb(), 3), "base_rss_gb": round(base, 3)}


def score(model, spec: dict) -> dict:
    """ms per image of anomalib's inference on ``spec["score_n"]`` test images; their distances to
    ``spec["distances_out"]``."""
    import numpy as np
    import torch

    model.eval()
    images = common.load_batch(common.test_paths(spec["score_n"]))
    seconds, distances = 0.0, []
    with torch.no_grad():
        for batch in images.split(common.BATCH):
            began = time.perf_counter()
            model(batch)
            seconds += time.perf_counter() - began
            embedding = model.generate_embedding(model.feature_extractor(batch))
            distances.append(model.anomaly_map_generator.compute_distance(
                embedding, [model.gaussian.mean, model.gaussian.inv_covariance])[:, 0].numpy())
    if spec.get("distances_out"):
        np.save(spec["distances_out"], np.concatenate(distances).astype(np.float64))
    return {"score_ms_per_image": round(1000 * seconds / len(images), 2)}


def shipped_inverse_check(model, shipped_inverse, d: int) -> dict:
    """anomalib's own call on its own matrices (the first 16 positions' regularised covariances):
    ``hung`` after ``INVERSE_CHECK_LIMIT_S``, ``raised``, or the residual of the inverse."""
    import torch

    precision = model.gaussian.inv_covariance[:16]
    covariance = cholesky_inverse_batched(precision.double()).float()  # back to Sigma + eps I
    check = {"hung": True, "after_s": INVERSE_CHECK_LIMIT_S}  # unless the thread below finishes in time

    def run() -> None:
        try:
            inverse = shipped_inverse(covariance)
            residual = (covariance.double() @ inverse.double() - torch.eye(d, dtype=torch.float64)).abs().amax()
            check.update(hung=False, raised=False, max_abs_residual=float(residual))
        except Exception as exc:  # noqa: BLE001 - what happens is the finding
            check.update(hung=False, raised=True, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    # torch's batched inverse was seen to hang on this CPU: wait a bounded time, then report that
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(INVERSE_CHECK_LIMIT_S)
    return dict(check)


def main(spec: dict) -> None:
    import torch

    common.set_threads(spec["threads"])
    import anomalib

    model, shipped_inverse = build_model(spec)
    result = {"anomalib_version": anomalib.__version__, "inverse": spec.get("inverse", "threaded")}
    probe = common.load_batch(common.test_paths(4))
    result["backbone_max_abs_diff"] = backbone_difference(model, spec, probe)
    with torch.no_grad():  # warm-up, not timed (as for ours)
        model.eval()
        model.feature_extractor(probe)
    result.update(fit(model, spec))
    if spec.get("score_n"):
        result.update(score(model, spec))
    if spec.get("check_shipped_inverse"):
        result["shipped_inverse_check"] = shipped_inverse_check(model, shipped_inverse, spec["d"])
    common.emit(result)
    os._exit(0)  # a hung inverse thread must not keep the process alive


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
