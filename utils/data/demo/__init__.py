"""Synthetic data sets, generated offline (no download), and the one trigger that generates them.

- :mod:`utils.data.demo.brains`: brain slices in the study's layout (``data.format: demo``);
- :mod:`utils.data.demo.nifti`: NIfTI volumes with a manifest (``configs/nifti_demo.yaml``);
- :mod:`utils.data.demo.mvtec`: a colour category in the MVTec AD layout.

:func:`ensure_demo` is called by every path that reads data (``fit``, ``evaluate``, ``predict``,
the notebook, every ``torchrun`` rank through :func:`utils.data.load_data`): the set a config names
is generated on first use, once.
"""

from __future__ import annotations

import json
import os

from ...config import Settings
from ...errors import DataError
from .brains import generate_demo
from .nifti import generate_nifti_demo

#: The embedded NIfTI demo's manifest (configs/nifti_demo.yaml): generated there when absent.
DEMO_MANIFEST = "data/demo_nifti/volumes.csv"


def ensure_demo(settings: Settings) -> None:
    """Generate the demo set ``settings`` read, unless it is there already: the brain slices at
    ``data.root`` (format demo), or the NIfTI demo when ``data.manifest`` is :data:`DEMO_MANIFEST`.
    A set that is there was generated with the seed its ``demo.json`` records: another
    ``data.demo_seed`` is refused (its files would be read under the new seed's name)."""
    d = settings.data
    if d.format == "demo":
        _ensure(f"data.root {d.root}", d.root, os.path.join(d.root, "data"), os.path.join(d.root, "data", "splits"),
                d.demo_seed, lambda: generate_demo(d.root, seed=d.demo_seed))
    elif d.format == "nifti" and os.path.normpath(d.manifest) == os.path.normpath(DEMO_MANIFEST):
        root = os.path.dirname(DEMO_MANIFEST)
        _ensure(f"the NIfTI demo folder {root}", root, root, DEMO_MANIFEST, d.demo_seed,
                lambda: generate_nifti_demo(root, seed=d.demo_seed))


def _ensure(name: str, root: str, record: str, marker: str, seed: int, generate) -> None:
    """``generate()`` the set at ``root`` (``name`` in messages) unless ``marker``, a file or folder it
    writes, exists; then its ``record`` folder's demo.json must name ``seed``."""
    if not os.path.exists(marker):
        _generate(name, root, marker, generate)
    try:
        with open(os.path.join(record, "demo.json"), encoding="utf-8") as handle:
            recorded = json.load(handle).get("seed")
    except (OSError, ValueError, AttributeError):
        recorded = "unknown"
    if recorded != seed:
        raise DataError(f"{name} holds the demo set of seed {recorded}, not data.demo_seed {seed}: delete it, or point the "
                        f"config at an absent or empty folder, to generate the set of seed {seed}")


def _generate(name: str, root: str, marker: str, generate) -> None:
    """``generate()`` the set at ``root``, which must be absent or empty (another process may fill it meanwhile)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"{name} is a file; point the config at an absent or empty folder to generate the demo set there")
    if os.path.isdir(root) and os.listdir(root):
        raise DataError(f"{name} exists but holds no demo set ({marker} is missing); "
                        "point the config at an empty or absent folder to generate the demo there")
    try:
        generate()
    except FileExistsError:  # another process generated it meanwhile
        if not os.path.exists(marker):
            raise DataError(f"{name} was filled by another process while the demo set was generated there") from None
    except OSError as exc:
        raise DataError(f"cannot write the demo set to {root}: {exc.strerror or exc}") from None
