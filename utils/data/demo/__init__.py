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
    """Generate the demo set ``settings`` read, unless it is there already: the brain slices at ``data.root``
    (format demo; there when it has data/splits), or the NIfTI demo when ``data.manifest`` is
    :data:`DEMO_MANIFEST` (there when that manifest is).
    The set is generated only into an absent or empty folder (another process may generate it meanwhile).
    A set that is there was generated with the seed its ``demo.json`` records: another
    ``data.demo_seed`` is refused (its files would be read under the new seed's name)."""
    d = settings.data
    if d.format == "demo":
        name, root, generate = f"data.root {d.root}", d.root, generate_demo
        record, marker = os.path.join(root, "data"), os.path.join(root, "data", "splits")
    elif d.format == "nifti" and os.path.normpath(d.manifest) == os.path.normpath(DEMO_MANIFEST):
        root = record = os.path.dirname(DEMO_MANIFEST)
        name, generate, marker = f"the NIfTI demo folder {root}", generate_nifti_demo, DEMO_MANIFEST
    else:
        return
    if not os.path.exists(marker):
        try:
            generate(root, seed=d.demo_seed)
        except FileExistsError as exc:  # the folder holds other files, or another process generated the set meanwhile
            if not os.path.exists(marker):
                raise DataError(f"{name} holds no demo set ({marker} is missing) and cannot take one: {exc.strerror}; "
                                "point the config at an absent or empty folder to generate it there") from None
        except OSError as exc:
            raise DataError(f"cannot write the demo set to {root}: {exc.strerror or exc}") from None
    try:
        with open(os.path.join(record, "demo.json"), encoding="utf-8") as handle:
            recorded = json.load(handle).get("seed")
    except (OSError, ValueError, AttributeError):
        recorded = "unknown"
    if recorded != d.demo_seed:
        raise DataError(f"{name} holds the demo set of seed {recorded}, not data.demo_seed {d.demo_seed}: delete it, "
                        f"or point the config at an absent or empty folder, to generate the set of seed {d.demo_seed}")
