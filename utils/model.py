"""The fitted PaDiM estimator: ``fit``, ``score``, ``save`` and ``load``.

Images enter as preprocessed float tensors ``(N, 3, S, S)`` (see :mod:`utils.preprocess`),
either one tensor or an iterable of batches (a ``DataLoader``, a list); batches may also be
mappings with an ``"image"`` entry, as the datasets of :mod:`utils.data` yield.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import BACKBONES
from .config import Settings, settings_from_dict
from .errors import DataError, ModelFileError
from .features import PatchEmbedder, exact_float32, random_channel_indices, resolve_device, semi_orthogonal_projection
from .files import atomic_writer
from .gaussian import GaussianStatistics, pool_neighbourhoods, regularised_whitening
from .preprocess import head_masks
from .scoring import anomaly_maps, image_scores, mahalanobis
from .shrinkage import FourthMoments, ledoit_wolf_shrinkage, shrink_scatter

ImageSource = Union[torch.Tensor, Iterable[Union[torch.Tensor, Mapping[str, Any]]]]

FILE_FORMAT = "padim-model"
#: 2: the file stores ``whitening`` (inverse Cholesky factors); 1 stored ``precision`` (still read).
FILE_VERSION = 2
#: Settings that define a fitted model: a file fitted with other values cannot serve a request.
MODEL_KEYS = ("backbone", "weights", "layers", "output_dimension", "seed", "image_size", "epsilon", "covariance_dtype",
              "covariance_shrinkage", "flip_train", "spatial_pooling", "channel_reduction")
#: Data settings that change what the model sees, so they must match too.
MODEL_DATA_KEYS = ("resize", "intensity")


@dataclass
class ScoreResult:
    """``maps``: ``(N, S, S)`` float32 anomaly maps; ``scores``: ``(N,)`` image scores."""

    maps: np.ndarray
    scores: np.ndarray


#: Images per fold of the streaming statistics (see :meth:`Padim.accumulate`).
STAGING_IMAGES = 64
#: On CPU the fit runs the backbone on chunks of at most this many images of each batch. It
#: bounds the activation memory of the forward pass (wide_resnet50_2 at 128 px: +0.11 GB for 8
#: images, +0.26 GB for 32), which sits on top of the (P, d, d) scatter at the fit's peak; on the
#: project's 2-core CPU 8-image chunks were as fast as whole batches of 32 (bench/README.md).
#: On CUDA whole batches are used (small chunks would starve the GPU).
CPU_FORWARD_CHUNK = 8


def staging_rows(batch_size: int, positions: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Images held by the fit's staging buffer: ``STAGING_IMAGES``, at least one batch, and (for
    large ``d``) no more than 1/16 of the scatter's memory (at least 64 MB allowed).

    A larger buffer means fewer, longer passes over the ``(P, d, d)`` scatter but adds to the
    fit's peak memory. wide_resnet50_2, d = 550, on 2 cores: folding 198 images took 1.45-1.75 s
    in 33-image folds (75 MB buffer, this limit) and 1.11-1.22 s in 64-image folds (146 MB), but
    the larger buffer raised the fit's peak from ~2.33 to 2.42 GB: more than a third of
    anomalib's 7.06 GB, the memory target of bench/run.py.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = positions * dim * itemsize
    budget = max(positions * dim * dim * itemsize // 16, 64 * 2**20)
    return max(batch_size, min(STAGING_IMAGES, budget // row_bytes - 1))


class Padim:
    """PaDiM: a Gaussian per patch position over pretrained CNN features (Defard et al., 2021).

    >>> model = Padim(settings).fit(train_batches)       # doctest: +SKIP
    >>> result = model.score(test_batches)                # result.maps: (N, S, S)
    >>> model.save("models/padim.pt"); Padim.load("models/padim.pt")
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        total, kept = settings.total_channels, settings.kept_channels
        #: Channels taken from the backbone; with ``semi_orthogonal`` all of them, then projected to ``kept``.
        self.projection: torch.Tensor | None = None
        if settings.channel_reduction == "semi_orthogonal":
            self.channel_indices = torch.arange(total)
            self.projection = semi_orthogonal_projection(total, kept, settings.seed)
        else:
            self.channel_indices = random_channel_indices(total, kept, settings.seed)
        self.mean: torch.Tensor | None = None
        #: ``(P, d, d)`` with ``W^T W`` the precision (inverse covariance) at each position;
        #: a fit stores the inverse lower Cholesky factor (see :func:`utils.gaussian.regularised_whitening`).
        self.whitening: torch.Tensor | None = None
        self.train_count = 0
        #: Mean Ledoit-Wolf coefficient of the fit (``covariance_shrinkage: ledoit_wolf``), else None.
        self.shrinkage: float | None = None
        self._moments: FourthMoments | None = None
        self._embedder: PatchEmbedder | None = None

    # ------------------------------------------------------------------ features
    @property
    def embedder(self) -> PatchEmbedder:
        if self._embedder is None:
            s = self.settings
            self._embedder = PatchEmbedder(
                s.backbone, s.weights, s.layers, self.channel_indices, BACKBONES[s.backbone].stage_channels, seed=s.seed,
                projection=self.projection,
            ).to(self.device)
            self._embedder.cuda_batch = s.batch_size
        return self._embedder

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(N, 3, S, S)`` -> patch embeddings ``(N, d, S/4, S/4)``."""
        return self.embedder(images.to(self.device, non_blocking=True))

    def _batches(self, images: ImageSource, desc: str, progress: bool) -> Iterator[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            images = images.split(self.settings.batch_size)
        total = len(images) if hasattr(images, "__len__") else None
        for batch in tqdm(images, desc=desc, total=total, disable=not progress, unit="batch", leave=False):
            if isinstance(batch, Mapping):
                batch = batch["image"]
            yield self._checked(batch)

    def _checked(self, batch: torch.Tensor) -> torch.Tensor:
        size = self.settings.image_size
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise DataError(f"expected preprocessed images of shape (N, 3, {size}, {size}), got {shape}")
        if not batch.is_floating_point():
            raise DataError(f"expected float images (preprocessed), got dtype {batch.dtype}")
        if not bool(torch.isfinite(batch).all()):
            raise DataError("input images contain NaN or Inf values")
        return batch

    # ------------------------------------------------------------------ fitting
    def accumulate(self, images: ImageSource, progress: bool = True) -> GaussianStatistics:
        """Streaming statistics of the embeddings of ``images`` (one shard of a fit).

        Embeddings are copied, one block per position, into a position-major staging buffer of
        :func:`staging_rows` images (two batches by default) that is folded into the statistics
        when full: the ``(P, d, d)`` scatter is read and written once per 64 images instead of
        once per batch, and for large ``d`` only its lower triangle is updated (``?syrk``), then
        completed once at the end. The buffer has a fixed size, so memory does not grow with the number of
        images; see ``bench/README.md`` for figures.
        """
        return self._accumulate(images, progress, symmetric=True)

    def _accumulate(self, images: ImageSource, progress: bool, symmetric: bool) -> GaussianStatistics:
        s = self.settings
        dtype = getattr(torch, s.covariance_dtype)
        grid = s.feature_size
        positions, dim = grid * grid, s.kept_channels
        with torch.inference_mode(), exact_float32(self.device):
            stats = GaussianStatistics.empty(positions, dim, dtype=dtype, device=self.device)
            capacity = staging_rows(s.batch_size, positions, dim, dtype)
            staging = torch.empty(positions, capacity + 1, dim, dtype=dtype, device=self.device)
            moments = FourthMoments(positions, dim, self.device) if s.covariance_shrinkage == "ledoit_wolf" else None
            filled = 0
            batches = self._batches(images, "fit", progress)
            if s.flip_train:  # every image and its left-right mirror image
                batches = (view for batch in batches for view in (batch, batch.flip(-1)))
            for batch in batches:
                n = batch.shape[0]
                if filled + n > capacity:
                    stats.fold_rows(staging, filled, lower_only=True)
                    filled = 0
                if n > capacity:  # a batch larger than the buffer: fold it on its own
                    embeddings = self.embed(batch)
                    if moments is not None:
                        moments.update(embeddings.flatten(2).permute(2, 0, 1))
                    stats.update(embeddings)
                    continue
                chunk = CPU_FORWARD_CHUNK if self.device.type == "cpu" else n
                for start in range(0, n, chunk):
                    part = batch[start : start + chunk]
                    # Embed into a fresh position-major chunk, then copy it into the staging rows in
                    # one block per position: writing the stages' selected channels straight into
                    # the (large) staging buffer scattered the writes and cost wide_resnet50_2 3.4 s
                    # over 711 images; this copy costs ~0.3 s.
                    embedded = self.embed(part).permute(2, 3, 0, 1).reshape(positions, len(part), dim)
                    staging[:, filled + start : filled + start + len(part)].copy_(embedded)
                if moments is not None:  # before the fold centres the staged rows in place
                    moments.update(staging[:, filled : filled + n])
                filled += n
            self._moments = moments
            stats.fold_rows(staging, filled, lower_only=True)
            del staging
            if symmetric:
                stats.symmetrise()
        return stats

    def fit_statistics(self, stats: GaussianStatistics) -> "Padim":
        """Finish a fit from accumulated statistics (consumes ``stats`` to save memory)."""
        if stats.count <= 0:
            raise DataError("cannot fit PaDiM: the training set is empty")
        with torch.inference_mode():
            self.train_count = stats.count
            if self.settings.spatial_pooling:
                grid = self.settings.feature_size
                stats = pool_neighbourhoods(stats, grid, grid, self.settings.spatial_pooling)
            self.mean = stats.mean.clone()
            if self.settings.covariance_shrinkage == "ledoit_wolf":
                if self._moments is None:
                    raise DataError("covariance_shrinkage ledoit_wolf needs the fit's moments: fit with fit() or accumulate()")
                shrinkage = ledoit_wolf_shrinkage(stats, self._moments)
                shrink_scatter(stats, shrinkage)
                self.shrinkage = float(shrinkage.mean())
                self._moments = None
            self.whitening = regularised_whitening(stats, self.settings.epsilon, in_place=True)
        return self

    def fit(self, images: ImageSource, progress: bool = True) -> "Padim":
        """Fit the per-position Gaussians on normal images; memory stays flat in the number of images."""
        # The whitening reads only the lower triangle of the scatter: skip completing the upper one.
        return self.fit_statistics(self._accumulate(images, progress, symmetric=False))

    @property
    def is_fitted(self) -> bool:
        return self.whitening is not None

    @property
    def precision(self) -> torch.Tensor | None:
        """``(P, d, d)`` inverse covariances ``W^T W``, computed from :attr:`whitening` on each access (for inspection)."""
        if self.whitening is None:
            return None
        with torch.inference_mode(), exact_float32(self.whitening.device):
            return torch.bmm(self.whitening.mT, self.whitening)

    # ------------------------------------------------------------------ scoring
    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances on the patch grid ``(N, S/4, S/4)`` for one batch."""
        self._require_fitted()
        with exact_float32(self.device):
            return mahalanobis(self.embed(images), self.mean, self.whitening)

    def score(self, images: ImageSource, progress: bool = True, region: torch.Tensor | None = None) -> ScoreResult:
        """Anomaly maps ``(N, S, S)`` and image scores ``(N,)`` for ``images``.

        ``region`` (optional ``(N, S, S)`` bool) restricts the image score to those pixels, e.g.
        the head mask; the maps themselves are never masked or normalised.
        """
        self._require_fitted()
        maps = []
        with torch.inference_mode(), exact_float32(self.device):
            for batch in self._batches(images, "score", progress):
                distances = self.distances(batch).float()
                if self.settings.flip_test:  # the flipped image's map, mirrored back; averaging commutes with the (linear) upsampling
                    distances = 0.5 * (distances + self.distances(batch.flip(-1)).float().flip(-1))
                batch_maps = anomaly_maps(distances, self.settings.image_size, self.settings.blur_sigma).cpu()
                if self.settings.mask_background:
                    batch_maps = batch_maps * head_masks(batch, margin=max(1, round(self.settings.blur_sigma)))
                maps.append(batch_maps)
        if not maps:
            raise DataError("nothing to score: no images were given")
        all_maps = torch.cat(maps)
        if region is not None and region.shape != all_maps.shape:
            raise DataError(f"region shape {tuple(region.shape)} does not match maps {tuple(all_maps.shape)}")
        scores = image_scores(all_maps, self.settings.image_score, region)
        return ScoreResult(all_maps.numpy(), scores.numpy())

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ModelFileError("this PaDiM model is not fitted: call fit() or Padim.load() first")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write the model to one file, atomically: a temporary file in the same folder, then rename.

        An interrupted save never leaves a partial file at ``path``. The file holds only tensors,
        numbers and a JSON string, so :meth:`load` reads it with ``weights_only=True``.
        """
        self._require_fitted()
        path = os.fspath(path)
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "settings": json.dumps(self.settings.to_dict()),
            "channel_indices": self.channel_indices.clone(),
            "mean": self.mean.detach().cpu().clone(),
            "whitening": self.whitening.detach().cpu().clone(),
            "train_count": int(self.train_count),
        }
        with atomic_writer(path, durable=True) as stream:
            torch.save(payload, stream)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, settings: Settings | None = None) -> "Padim":
        """Read a model file written by :meth:`save`.

        With ``settings``, the file must have been fitted with the same model-defining settings
        (backbone, weights, layers, channels, seed, image size, epsilon, preprocessing); run-time
        settings such as device, batch size, blur and image score are taken from ``settings``.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelFileError(f"model file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{path} is not a readable PaDiM model file ({reason[:200]})") from None
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise ModelFileError(f"{path} is not a PaDiM model file (no '{FILE_FORMAT}' header)")
        version = payload.get("version")
        if version not in (1, FILE_VERSION):
            raise ModelFileError(f"{path} has model file version {version}; this code reads 1 and {FILE_VERSION}")
        try:
            stored = settings_from_dict(json.loads(payload["settings"]))
            mean = payload["mean"]
            whitening = payload["whitening"] if version == FILE_VERSION else _whitening_from_precision(payload["precision"])
            channel_indices, train_count = payload["channel_indices"], int(payload["train_count"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{path} is a damaged PaDiM model file ({str(exc).splitlines()[0][:200]})") from None
        if settings is not None:
            _check_compatible(stored, settings, path)
            run_time = {k: v for k, v in settings.to_dict().items() if k not in MODEL_KEYS}
            run_time["data"] = {**run_time["data"], **{k: getattr(stored.data, k) for k in MODEL_DATA_KEYS}}
            stored = stored.replace(**run_time)
        model = cls(stored)
        positions, dim = stored.feature_size**2, stored.kept_channels
        if (
            not torch.equal(model.channel_indices, channel_indices)
            or tuple(mean.shape) != (positions, dim)
            or tuple(whitening.shape) != (positions, dim, dim)
        ):
            raise ModelFileError(f"{path} is inconsistent: its tensors do not match its own settings")
        model.mean = mean.to(model.device)
        model.whitening = whitening.to(model.device)
        model.train_count = train_count
        return model


def _whitening_from_precision(precision: torch.Tensor) -> torch.Tensor:
    """A version-1 file's precision ``P`` -> lower-triangular ``W`` with ``W^T W = P`` (in float64).

    With ``J`` the exchange matrix (index reversal) and ``J P J = R R^T`` (Cholesky, ``R``
    lower), ``W = J R^T J`` is lower triangular and ``W^T W = J R R^T J = P``: the fit's ``W``
    (the inverse Cholesky factor of the covariance is the unique such matrix with a positive
    diagonal) without inverting anything.
    """
    if not isinstance(precision, torch.Tensor) or precision.ndim != 3:
        raise TypeError("precision is not a (P, d, d) tensor")
    factor, info = torch.linalg.cholesky_ex(precision.double().flip(-2, -1))
    if bool((info != 0).any()):
        raise ValueError("its precision matrices are not positive definite")
    return factor.mT.flip(-2, -1).to(precision.dtype).contiguous()


def _check_compatible(stored: Settings, requested: Settings, path: str) -> None:
    differences = [
        f"{key}: file {getattr(stored, key)!r} vs config {getattr(requested, key)!r}"
        for key in MODEL_KEYS
        if getattr(stored, key) != getattr(requested, key)
    ] + [
        f"data.{key}: file {getattr(stored.data, key)!r} vs config {getattr(requested.data, key)!r}"
        for key in MODEL_DATA_KEYS
        if getattr(stored.data, key) != getattr(requested.data, key)
    ]
    if differences:
        raise ModelFileError(f"{path} was fitted with other settings ({'; '.join(differences)}); refit or fix the config")
