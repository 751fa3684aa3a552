"""The fitted model's file: save, load, validation and the one compatibility check.

A file holds only tensors, numbers and a JSON string of the settings, is written atomically
(temporary file, then rename) and read with ``torch.load(weights_only=True)``: loading never
runs code. Everything read is checked (types, dtypes, shapes, finite values) before it is used.
"""

from __future__ import annotations

import json
import pickle
import os
import warnings
import zipfile
from operator import attrgetter

import torch

from ..config import Settings, settings_from_dict
from ..errors import ConfigError, ModelFileError
from ..files import atomic_writer, file_problem
from .backbones import weights_digest
from .features import channel_selection
from .gaussian import all_finite

FILE_FORMAT = "padim-model"
#: 6: the file stores ``cholesky`` (lower Cholesky factors of the regularised covariances), what the
#: model knows of its training files: ``train_fingerprint``, ``train_digests``, ``train_kind``, and the
#: SHA-256 of a weights file it was fitted with; files of other versions are refused with one line (refit them).
FILE_VERSION = 6
#: Settings that define a fitted model: a file fitted with other values cannot serve a request.
MODEL_KEYS = ("backbone", "weights", "layers", "output_dimension", "seed", "image_size", "epsilon", "covariance_dtype",
              "covariance_shrinkage", "flip_train", "spatial_pooling", "channel_reduction")
#: Data settings that change what the model sees, so they must match too (the NIfTI ones, :data:`VOLUME_KEYS`,
#: only for a model fitted on volumes).
MODEL_DATA_KEYS = ("resize", "intensity", "color", "center_crop", "align", "volume_intensity", "min_brain_fraction")
VOLUME_KEYS = ("volume_intensity", "min_brain_fraction")
#: The two kinds of input a model is fitted on, by whether ``data.format`` is ``nifti``.
INPUT_KINDS = {False: "images (PNG, MVTec, demo)", True: "NIfTI volume slices"}


def check_input_kind(stored: Settings, volumes: bool, what: str) -> None:
    """Raise :class:`ModelFileError` when ``what`` (a model fitted with the settings ``stored``) is
    used on inputs of the other kind: a model fitted on NIfTI volume slices (``data.format: nifti``)
    scores no plain images (PNG, MVTec, demo), and the reverse. ``volumes``: the inputs are NIfTI."""
    fitted = stored.data.format == "nifti"
    if fitted != volumes:
        raise ModelFileError(f"{what} was fitted on {INPUT_KINDS[fitted]} and cannot score {INPUT_KINDS[volumes]}: "
                             f"fit a model on {INPUT_KINDS[volumes]} (`python -m utils fit` with their config)")


def check_compatible(stored: Settings, requested: Settings, what: str) -> None:
    """Raise :class:`ModelFileError` when ``what`` (a model file, a given model) was fitted on the
    other kind of input (:func:`check_input_kind`), or naming every model-defining setting in which
    it differs from the requested settings."""
    check_input_kind(stored, requested.data.format == "nifti", what)
    volumes = stored.data.format == "nifti"
    keys = MODEL_KEYS + tuple(f"data.{key}" for key in MODEL_DATA_KEYS if volumes or key not in VOLUME_KEYS)
    values = {key: (attrgetter(key)(stored), attrgetter(key)(requested)) for key in keys}
    differences = [f"{key}: {old!r} vs config {new!r}" for key, (old, new) in values.items() if old != new]
    if differences:
        raise ModelFileError(f"{what} was fitted with other settings ({'; '.join(differences)}); refit or fix the config")


def save_state(model, path: str | os.PathLike) -> str:
    """Write a fitted :class:`utils.padim.Padim` ``model`` to ``path`` atomically (and durably: fsync
    before the rename); returns the path. The file holds what :func:`load_state` returns: the settings
    the model was fitted with, its per-position means ``(P, d)`` and Cholesky factors ``(P, d, d)``,
    the number of training samples, the :func:`utils.data.fingerprint` of the training files
    ("" when unknown), their content digests and their kind (colour or gray)."""
    path = os.fspath(path)
    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "settings": json.dumps(model.settings.to_dict()),
        "channel_indices": channel_selection(model.settings)[0],
        "mean": model.mean.detach().cpu().clone(),
        "cholesky": model.cholesky.detach().cpu().clone(),
        "train_count": int(model.train_count),
        "train_fingerprint": model.train_fingerprint,
        "train_digests": model.train_digests.cpu(),
        "train_kind": model.train_kind,
        "weights_sha256": weights_digest(model.settings.weights),
    }
    with atomic_writer(path, durable=True) as stream:
        try:
            torch.save(payload, stream)
        except RuntimeError as exc:
            # torch turns the stream's own failure (a full disk, an interruption) into a RuntimeError
            if isinstance(exc.__context__, OSError | KeyboardInterrupt):
                raise exc.__context__ from None
            raise
    return path


def is_model_file(path: str) -> bool:
    """Whether ``path`` is a PaDiM model file, judged from its archive's small header pickle only
    (not the tensors): what may be replaced by a new model."""
    try:
        with zipfile.ZipFile(path) as archive:
            header = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
            return header is not None and FILE_FORMAT.encode() in archive.read(header)
    except (OSError, zipfile.BadZipFile):
        return False


def _read(path: str) -> dict:
    if problem := file_problem(path):
        raise ModelFileError(f"model file {problem}: {path}")
    try:
        with zipfile.ZipFile(path) as archive:  # torch's loader does not check the entries' CRC-32 sums
            names = archive.namelist()
            if not any(name.endswith("/data.pkl") for name in names) or any("/" not in name for name in names):
                raise ModelFileError(f"{path} is not a readable PaDiM model file (a zip archive but no torch file: "
                                     "no <folder>/data.pkl)")
            if (damaged := archive.testzip()) is not None:
                raise ModelFileError(f"{path} is damaged: its entry {damaged} fails its checksum "
                                     "(a changed or corrupted byte)")
    except zipfile.BadZipFile:  # torch's own words for it are an internal error of its zip library
        with open(path, "rb") as handle:
            start = handle.read(2)
        what = ("a truncated or damaged zip archive: its directory is missing" if start in (b"PK", b"")  # or empty
                else "not a zip archive, as every torch file is")
        raise ModelFileError(f"{path} is not a readable PaDiM model file ({what})") from None
    except OSError:
        pass  # torch.load below says what is wrong
    try:
        with warnings.catch_warnings():  # a foreign pickle makes torch warn before it fails: the error says it all
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in reason:
            reason = "it holds objects other than tensors, numbers and strings; refused without running them"
        raise ModelFileError(f"{path} is not a readable PaDiM model file ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ModelFileError(f"{path} is not a PaDiM model file (no '{FILE_FORMAT}' header)")
    if payload.get("version") != FILE_VERSION:
        raise ModelFileError(f"{path} has model file version {payload.get('version')!r}; this code reads version "
                             f"{FILE_VERSION}: refit the model with `python -m utils fit`")
    return payload


def _tensor(payload: dict, key: str, shape: tuple, dtypes: tuple, path: str) -> torch.Tensor:
    """``payload[key]``, checked: a tensor of one of ``dtypes``, of ``shape`` (``None``: any length there), finite."""
    value = payload.get(key)
    if not isinstance(value, torch.Tensor):
        raise ModelFileError(f"{path} is damaged: `{key}` is {type(value).__name__}, not a tensor")
    shape = tuple(value.shape[i] if n is None and i < value.dim() else n for i, n in enumerate(shape))
    if value.dtype not in dtypes or tuple(value.shape) != shape:
        raise ModelFileError(f"{path} is damaged: `{key}` is {value.dtype} {tuple(value.shape)}, expected "
                             f"{' or '.join(map(str, dtypes))} {shape}")
    if value.is_floating_point() and not all_finite(value):
        raise ModelFileError(f"{path} is damaged: `{key}` holds NaN or Inf values")
    return value


def load_state(path: str | os.PathLike,
               settings: Settings | None = None) -> tuple[Settings, torch.Tensor, torch.Tensor, dict]:
    """Read and check a model file written by :func:`save_state`: ``(settings, mean, cholesky, record)``,
    ``record`` what it knows of its training files: ``train_count``, ``train_fingerprint``, ``train_digests``
    and ``train_kind``.

    With ``settings``, the file must have been fitted with the same model-defining settings
    (:func:`check_compatible`); run-time settings (device, batch size, blur, image score, data
    paths, ...) are then taken from ``settings``.
    """
    path = os.fspath(path)
    payload = _read(path)
    try:
        stored = settings_from_dict(json.loads(payload["settings"]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelFileError(f"{path} is damaged: its settings cannot be read ({str(exc).splitlines()[0][:200]})") from None
    if settings is not None:
        check_compatible(stored, settings, path)
        stored = settings  # equal in every model-defining key; the run-time keys are the request's
    # a weights file that is gone: the backbone says so when it is built
    if (now := weights_digest(stored.weights)) and now != payload.get("weights_sha256"):
        raise ModelFileError(f"{path} was fitted with other weights than the file {stored.weights} holds now (another "
                             "SHA-256): refit the model, or restore the weights file it was fitted with")
    positions, dim = stored.feature_size**2, stored.kept_channels
    expected = channel_selection(stored)[0]
    indices = _tensor(payload, "channel_indices", tuple(expected.shape), (torch.int64,), path)
    if not torch.equal(indices, expected):
        raise ModelFileError(f"{path} is inconsistent: its channel indices do not follow from its own settings")
    count, fingerprint, kind = payload.get("train_count"), payload.get("train_fingerprint"), payload.get("train_kind")
    if not isinstance(count, int) or count < 1:
        raise ModelFileError(f"{path} is damaged: `train_count` is {count!r}")
    if not isinstance(fingerprint, str) or len(fingerprint) > 64:
        raise ModelFileError(f"{path} is damaged: `train_fingerprint` is {fingerprint!r:.80}")
    if kind not in ("", "colour", "gray"):
        raise ModelFileError(f"{path} is damaged: `train_kind` is {kind!r:.80}")
    mean = _tensor(payload, "mean", (positions, dim), (torch.float64, torch.float32), path)
    cholesky = _tensor(payload, "cholesky", (positions, dim, dim), (getattr(torch, stored.covariance_dtype),), path)
    digests = _tensor(payload, "train_digests", (None,), (torch.int64,), path)
    record = {"train_count": count, "train_fingerprint": fingerprint, "train_digests": digests, "train_kind": kind}
    return stored, mean, cholesky, record
