"""Synthetic data sets, generated offline (no download), and the one trigger that generates them.

- :mod:`utils.data.demo.brains`: brain slices in the study's layout (``data.format: demo``);
- :mod:`utils.data.demo.nifti`: NIfTI volumes with a manifest (``configs/nifti_demo.yaml``);
- :mod:`utils.data.demo.mvtec`: a colour category in the MVTec AD layout.

:func:`ensure_demo` is called by every path that reads data (``fit``, ``evaluate``, ``predict``,
the notebook, every ``torchrun`` rank through :func:`utils.data.load_data`): the set a config names
is generated on first use, once.
"""

from __future__ import annotations

import os

from ...config import Settings
from ...errors import DataError
from .brains import generate_demo
from .nifti import generate_nifti_demo

#: The embedded NIfTI demo's manifest (configs/nifti_demo.yaml): generated there when absent.
DEMO_MANIFEST = "data/demo_nifti/volumes.csv"


def ensure_demo(settings: Settings) -> None:
    """Generate the demo set ``settings`` read, unless it is there already: the brain slices at
    ``data.root`` (format demo), or the NIfTI demo when ``data.manifest`` is :data:`DEMO_MANIFEST`."""
    d = settings.data
    if d.format == "demo":
        _generate(f"data.root {d.root}", d.root, os.path.join(d.root, "data", "splits"), lambda: generate_demo(d.root, seed=d.demo_seed))
    elif d.format == "nifti" and os.path.normpath(d.manifest) == os.path.normpath(DEMO_MANIFEST):
        root = os.path.dirname(DEMO_MANIFEST)
        _generate(f"the NIfTI demo folder {root}", root, DEMO_MANIFEST, lambda: generate_nifti_demo(root, seed=d.demo_seed))


def _generate(name: str, root: str, marker: str, generate) -> None:
    """``generate()`` the set at ``root`` (``name`` in messages) unless ``marker``, a file or folder it writes, exists."""
    if os.path.exists(marker):
        return
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
