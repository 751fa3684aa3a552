"""``predict``: heat-maps, anomaly maps and scores for images, anomaly maps for NIfTI volumes, from a fitted model.

Each image gets ``<relative path stem>_heatmap.png`` (a preview) and ``<stem>_anomaly.npy``: its
anomaly map as float32 on the image's own pixel grid (``(H, W)`` of the file, mapped back from the
network grid by :func:`utils.data.preprocess.restore_geometry`), so that any protocol can be
computed from the maps alone; NIfTI volumes get ``<case>_anomaly.nii.gz`` likewise.

Every output is written into a folder beside ``--output`` and swapped in at the end
(:func:`utils.files.staged_folder`): a failed or interrupted run leaves ``--output`` as it was,
and an earlier run's files are replaced as a whole, never mixed with new ones.
"""

from __future__ import annotations

import collections
import os
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import Settings
from .data import IMAGE_SUFFIXES, NIFTI_SUFFIXES, counted, prepare
from .data.listing import has_suffix, listed
from .data.load import warn_trained_on
from .data.preprocess import image_kind, read_image, restore_geometry
from .data.volumes import VolumeEntry, read_manifest, read_volume, score_volume, write_map
from .errors import DataError
from .evaluation.plotting import save_heatmap
from .evaluation.volumes import slice_scores
from .files import atomic_writer, relative_inside, staged_folder, write_atomic
from .padim import Padim
from .padim.model_file import check_input_kind


def predict(settings: Settings, model_path: str, source: str, output: str, progress: bool = True) -> list[str]:
    """Score every image or volume at ``source`` with the model at ``model_path`` into ``output``;
    returns one line per kind of input saying what was written."""
    model = Padim.load(model_path, settings)
    files = _input_files(source, output)
    volumes = [f for f in files if has_suffix(f, NIFTI_SUFFIXES + (".csv",))]  # a .csv: a NIfTI manifest
    images = [f for f in files if f not in volumes]
    for kind, inputs in ((True, volumes), (False, images)):
        if inputs:
            check_input_kind(model.settings, kind, f"model {model_path}")  # only the kind it was fitted on
    _check_image_kinds(model, images, model_path)
    entries = read_manifest(volumes, model.settings.data.volume_index) if volumes else []
    listed_files = [path for entry in entries for path in (entry.image, entry.label, entry.brain_mask) if path]
    inputs = [source, *images, *listed_files]
    # every input, the files a manifest lists too
    if inside := next((path for path in inputs if relative_inside(path, output) is not None), None):
        raise DataError(f"input {inside} is inside --output {output}, which predict replaces as a whole: it would be "
                        "lost; choose an output folder that does not hold the inputs")
    warn_trained_on(images + [entry.image for entry in entries], model.train_digests, "input file")
    with staged_folder(output, "predict") as staging:  # only an earlier predict output is replaced
        done = []
        if entries:
            rows = predict_volumes(model, entries, staging, progress)
            done.append(f"{counted(len(rows), 'volume')} scored; NIfTI maps, previews and volume_scores.csv")
        if images:
            done.append(_predict_images(model, images, source, staging, progress))
    return done


def _check_image_kinds(model: Padim, images: list[str], model_path: str) -> None:
    """A model fitted on colour images scores no gray ones, and the reverse (unless ``data.color: gray``
    reads both alike): their features differ, and the scores would say so, not where the anomaly is."""
    if model.train_kind and model.settings.data.color != "gray":
        for path in images:
            if (kind := image_kind(path)) != model.train_kind:
                raise DataError(f"model {model_path} was fitted on {model.train_kind} images and cannot score {path}, "
                                f"a {kind} image: fit a model on such images, or with data.color: gray")


def _input_files(source: str, output: str) -> list[str]:
    """``source`` itself when it is a file, else every image or NIfTI file below it; ``output``
    must lie outside a ``source`` folder (its heat-maps would be read as images by the next run)."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise DataError(f"--input {source} is neither an image/NIfTI file nor a folder")
    if relative_inside(output, source) is not None:
        raise DataError(f"--output {output} is inside --input {source}: the next run would score its heat-maps as "
                        "images; choose an output folder outside the input folder")
    files = listed(source, IMAGE_SUFFIXES + NIFTI_SUFFIXES, recursive=True)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}) found in {source}")
    return files


def _write_scores(path: str, table: pd.DataFrame) -> None:
    write_atomic(path, table.to_csv(index=False, float_format="%.6f").encode())


#: What ``predict`` writes per image beside the image's relative path stem.
HEATMAP, ANOMALY_MAP = "_heatmap.png", "_anomaly.npy"


def _predict_images(model, files: list[str], source: str, output: str, progress: bool) -> str:
    """Per image a heat-map PNG and its anomaly map (on the image's grid), and ``scores.csv``
    (image, score) in ``output``; returns what was done."""
    base = source if os.path.isdir(source) else os.path.dirname(source)
    relative = [os.path.relpath(f, base) for f in files]
    stems = [os.path.splitext(r)[0] for r in relative]
    # one output file on a file system that ignores case (macOS, Windows, a USB disk) clashes too
    counts = collections.Counter(stem.casefold() for stem in stems)
    if clash := sorted((stem.casefold(), path) for stem, path in zip(stems, relative) if counts[stem.casefold()] > 1):
        raise DataError(f"input images {clash[0][1]} and {clash[1][1]} would write one {clash[0][0]}{ANOMALY_MAP} (one "
                        "name with another suffix or case); rename one")
    stems = [os.path.join(output, stem) for stem in stems]
    rows, settings = [], model.settings
    for start in tqdm(range(0, len(files), settings.batch_size), desc="predict", unit="batch", leave=False, disable=not progress):
        arrays = [read_image(f, settings.data.color) for f in files[start : start + settings.batch_size]]
        prepared = [prepare(array, settings) for array in arrays]  # gray and colour files may mix: displays differ
        batch = {"image": torch.stack([p.image for p in prepared])}
        if settings.estimates_head:
            batch["foreground"] = torch.stack([p.head for p in prepared])
        result = model.score([batch], progress=False)
        for k, (p, array, heat, score) in enumerate(zip(prepared, arrays, result.maps, result.scores)):
            save_heatmap(p.display.numpy(), heat, stems[start + k] + HEATMAP)
            with atomic_writer(stems[start + k] + ANOMALY_MAP) as stream:  # float32 .npy, np.load reads it
                np.save(stream, restore_geometry(heat, array.shape[:2], settings))
            rows.append((relative[start + k], float(score)))
    _write_scores(os.path.join(output, "scores.csv"), pd.DataFrame(rows, columns=["image", "score"]))
    top = max(score for _, score in rows)
    return f"{counted(len(rows))} scored (max score {top:.3f}); heat-maps, anomaly maps and scores.csv"


def predict_volumes(model, entries: Sequence[VolumeEntry], output_dir: str, progress: bool = True) -> list[dict]:
    """Score each volume: ``<case>_anomaly.nii.gz`` (the input's shape and affine) and
    ``<case>_anomaly.png`` (the axial slice with the highest score inside the brain, RAS+ index)
    in ``output_dir``, and ``volume_scores.csv``. Returns its rows, one dict per volume: ``image``,
    ``score`` (the map's maximum inside the brain), ``slice``.

    The brain comes from the entry's ``brain_mask``, else it is estimated from the image: a model
    fitted on given brain masks should be given them here too (a manifest CSV), since the brain
    sets the intensity normalisation and the slices that are scored."""
    settings, rows = model.settings, []
    for entry in tqdm(entries, desc="predict", unit="volume", disable=not progress):
        volume = read_volume(entry, settings)
        anomaly = score_volume(model, volume, settings)
        in_brain = slice_scores(anomaly, volume.brain)
        if not volume.kept.any():  # nothing was scored: no score, rather than the 0 of an empty map
            raise DataError(f"{entry.source}: no slice of {entry.image} has data.min_brain_fraction of brain; nothing to score")
        z = int(np.argmax(np.where(volume.kept, in_brain, -np.inf)))
        stem = os.path.join(output_dir, f"{entry.case}_anomaly")
        write_map(anomaly, volume, stem + ".nii.gz")
        save_heatmap(np.flipud(volume.image[:, :, z].T), np.flipud(anomaly[:, :, z].T), stem + ".png")  # anterior up
        rows.append({"image": entry.image, "score": float(in_brain[z]), "slice": z})
    _write_scores(os.path.join(output_dir, "volume_scores.csv"), pd.DataFrame(rows, columns=["image", "score", "slice"]))
    return rows
