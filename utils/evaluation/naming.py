"""Run names: a results folder is named after every setting that can change a number in it and
the files the run reads, so a folder never describes two runs."""

from __future__ import annotations

import hashlib
import json
import os
import re

from ..config import Settings
from ..padim.backbones import weights_digest

#: Bump when the meaning of a run's files changes: old names can then never be mistaken for new ones.
RUN_NAME_VERSION = 6
#: Settings that change neither the model nor any number in the results (excluded from the run name).
RUN_TIME_KEYS = ("device", "batch_size", "results_dir", "target_dimension", "cpu_micro_batch", "cpu_channels_last")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.") or "x"


def run_name(settings: Settings, data_fingerprint: str) -> str:
    """``<format>-<backbone>-<weights>-<size>px-d<channels>-seed<seed>-<hash>``.

    The readable prefix names the main choices; the 10-hex-digit hash covers the canonical JSON of
    every setting that can change a result and the fingerprint of the files the run reads
    (:func:`utils.data.fingerprint`). Identical settings on identical files give the same name;
    anything that changes a result gives another name, so a results folder never describes two runs.

    Excluded: device, batch size, the CPU micro-batch and memory format, results folder, worker
    count and the ``target_dimension`` check, which change no number (beyond float rounding); and where
    the data lie (``data.root``, ``data.manifest``): the fingerprint names them wherever they are, so a data
    set moved, or copied with its times, keeps the name. ``data.demo_seed`` counts only for the demo format.
    A weights file is identified by its path and content hash, so replacing the file changes the name; so
    do images added to, removed from or rewritten in the data under the same config.
    """
    identity = {key: value for key, value in settings.to_dict().items() if key not in RUN_TIME_KEYS}
    data = identity["data"]
    for key in ("num_workers", "root", "manifest"):
        data.pop(key)
    if data["format"] != "demo":
        data.pop("demo_seed", None)
    if digest := weights_digest(settings.weights):
        identity["weights_sha256"] = digest
    identity |= {"data_fingerprint": data_fingerprint, "run_name_version": RUN_NAME_VERSION}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]
    weights = settings.weights if settings.weights in ("imagenet", "random") else os.path.splitext(os.path.basename(settings.weights))[0]
    prefix = f"{settings.data.format}-{settings.backbone}-{_slug(weights)[:24]}-{settings.input_size}px-d{settings.kept_channels}-seed{settings.seed}"
    return f"{prefix}-{digest}"

