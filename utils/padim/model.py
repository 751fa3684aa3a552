"""The fitted PaDiM estimator: ``fit``, ``score``, ``save`` and ``load``.

Images enter as preprocessed float tensors ``(N, 3, S, S)`` (see :mod:`utils.data.preprocess`),
either one tensor or an iterable of batches (a ``DataLoader``, a list); batches may also be
mappings with an ``"image"`` entry, as the datasets of :mod:`utils.data` yield.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Settings
from ..errors import DataError, ModelFileError
from .model_file import load_state, save_state
from .align import align_batch, from_canonical
from .features import PatchEmbedder, exact_float32, resolve_device
from .gaussian import GaussianStatistics, SampleBuffer, all_finite, pool_neighbourhoods, regularised_cholesky
from .foreground import dilated, head_masks
from .scoring import anomaly_maps, image_scores, mahalanobis
from .shrinkage import shrink_ledoit_wolf

ImageSource = Union[torch.Tensor, Iterable[Union[torch.Tensor, Mapping[str, Any]]]]


@dataclass
class ScoreResult:
    """``maps``: ``(N, S, S)`` float32 anomaly maps; ``scores``: ``(N,)`` image scores."""

    maps: np.ndarray
    scores: np.ndarray


def batches(images: ImageSource, settings: Settings, desc: str, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(images (N, 3, S, S), heads (N, S, S) bool or None)`` per batch, each batch a finite float
    tensor of that shape (else one :class:`DataError`). The heads are needed only for alignment and
    background masking: taken from the batch's ``foreground`` (estimated once in the data path,
    :func:`utils.data.preprocess.prepare`), else estimated here from the input."""
    if isinstance(images, torch.Tensor):
        images = images.split(settings.batch_size)
    size = settings.input_size
    for batch in tqdm(images, desc=desc, disable=not progress, unit="batch", leave=False):
        heads = batch.get("foreground") if isinstance(batch, Mapping) else None
        batch = batch["image"] if isinstance(batch, Mapping) else batch
        if not isinstance(batch, torch.Tensor) or batch.shape[1:] != (3, size, size) or not batch.is_floating_point():
            got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise DataError(f"expected preprocessed float images of shape (N, 3, {size}, {size}), got {got}")
        if not bool(torch.isfinite(batch).all()):
            raise DataError("input images contain NaN or Inf values")
        if heads is None and settings.estimates_head:
            heads = head_masks(batch)
        yield batch, heads


class Padim:
    """PaDiM: a Gaussian per patch position over pretrained CNN features (Defard et al., 2021).

    >>> model = Padim(settings).fit(train_batches)       # doctest: +SKIP
    >>> result = model.score(test_batches)                # result.maps: (N, S, S)
    >>> model.save("models/padim.pt"); Padim.load("models/padim.pt")
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.mean: torch.Tensor | None = None
        #: ``(P, d, d)`` lower Cholesky factors ``L`` of the regularised covariances, ``L L^T = covariance + epsilon I``
        #: at each position (:func:`utils.padim.gaussian.regularised_cholesky`).
        self.cholesky: torch.Tensor | None = None
        self.train_count = 0
        #: :func:`utils.data.sets.fingerprint` of the training files, set by whoever fitted on a data set
        #: ("" when unknown, e.g. a fit on a tensor): evaluating on other training files is refused.
        self.train_fingerprint = ""
        #: ``(F,)`` int64: the first 8 bytes of the SHA-256 of each training file, set with the fingerprint
        #: (:func:`utils.data.load.file_digests`): ``predict`` names inputs that are training files.
        self.train_digests = torch.zeros(0, dtype=torch.int64)
        #: ``colour`` or ``gray`` when every training image was that kind ("" otherwise): ``predict`` refuses the other.
        self.train_kind = ""

    # ------------------------------------------------------------------ features
    @functools.cached_property
    def embedder(self) -> PatchEmbedder:
        """The backbone and channel selection, built on first use: loading and saving a model never build it."""
        return PatchEmbedder(self.settings).to(self.device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(N, 3, S, S)`` -> patch embeddings ``(N, d, S/4, S/4)``, finite (else one
        :class:`DataError`: the images are, :func:`batches`, so the backbone's weights made them so)."""
        features = self.embedder(images.to(self.device, non_blocking=True))
        if not all_finite(features):
            raise DataError(f"the backbone gives NaN or Inf features for finite images: check its weights "
                            f"({self.settings.weights})")
        return features

    # ------------------------------------------------------------------ fitting
    def accumulate(self, images: ImageSource, progress: bool = True) -> GaussianStatistics:
        """Streaming statistics of the embeddings of ``images`` (one shard of a fit), batch by batch:
        memory does not grow with the number of images."""
        s = self.settings
        positions, dim = s.feature_size**2, s.kept_channels
        with torch.inference_mode(), exact_float32(self.device):
            stats = GaussianStatistics.empty(positions, dim, dtype=getattr(torch, s.covariance_dtype),
                                             device=self.device, moments=s.covariance_shrinkage == "ledoit_wolf")
            buffer = SampleBuffer(stats)
            for batch, heads in batches(images, s, "fit", progress):
                batch = align_batch(batch, s.data.align, heads)[0]
                for view in (batch, batch.flip(-1)) if s.flip_train else (batch,):  # flip_train: the mirror image too
                    buffer.add(self.embed(view))
            return buffer.flush()

    def fit_statistics(self, stats: GaussianStatistics) -> "Padim":
        """Finish a fit from accumulated statistics (consumes ``stats`` to save memory)."""
        if stats.count <= 0:
            raise DataError("cannot fit PaDiM: the training set is empty")
        with torch.inference_mode():
            self.train_count = stats.count
            grid = self.settings.feature_size
            stats = pool_neighbourhoods(stats, grid, grid, self.settings.spatial_pooling)  # radius 0: stats as they are
            self.mean = stats.mean.clone()
            if self.settings.covariance_shrinkage == "ledoit_wolf":
                shrink_ledoit_wolf(stats)
            self.cholesky = regularised_cholesky(stats, self.settings.epsilon)
        if not (all_finite(self.mean) and all_finite(self.cholesky)):
            raise DataError("the fit produced non-finite statistics: features too large to sum; check the backbone's "
                            f"weights ({self.settings.weights})")
        return self

    def fit(self, images: ImageSource, progress: bool = True) -> "Padim":
        """Fit the per-position Gaussians on normal images; returns ``self``."""
        return self.fit_statistics(self.accumulate(images, progress))

    # ------------------------------------------------------------------ scoring
    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances on the patch grid ``(N, S/4, S/4)`` for one batch."""
        self._require_fitted()
        with exact_float32(self.device):
            return mahalanobis(self.embed(images), self.mean, self.cholesky)

    def score(self, images: ImageSource, progress: bool = True, region: torch.Tensor | None = None) -> ScoreResult:
        """Anomaly maps ``(N, S, S)`` and image scores ``(N,)`` for ``images``.

        ``region`` (optional ``(N, S, S)`` bool) restricts the image score to those pixels, e.g.
        the head mask; the maps themselves are never masked or normalised.
        """
        self._require_fitted()
        maps = []
        with torch.inference_mode(), exact_float32(self.device):
            for batch, heads in batches(images, self.settings, "score", progress):
                canonical, transforms = align_batch(batch, self.settings.data.align, heads)
                distances = self.distances(canonical).float()
                if self.settings.flip_test:  # the flipped image's map, mirrored back; averaging commutes with the (linear) upsampling
                    distances = 0.5 * (distances + self.distances(canonical.flip(-1)).float().flip(-1))
                batch_maps = anomaly_maps(distances, self.settings.input_size, self.settings.blur_sigma).cpu()
                if transforms is not None:  # back to the image's own frame before anything else sees the map
                    batch_maps = from_canonical(batch_maps, transforms)
                if self.settings.mask_background:
                    batch_maps = batch_maps * dilated(heads, margin=max(1, round(self.settings.blur_sigma)))
                maps.append(batch_maps)
        if not maps:
            raise DataError("nothing to score: no images were given")
        all_maps = torch.cat(maps)
        if region is not None and region.shape != all_maps.shape:
            raise DataError(f"region shape {tuple(region.shape)} does not match maps {tuple(all_maps.shape)}")
        scores = image_scores(all_maps, self.settings.image_score, region)
        return ScoreResult(all_maps.numpy(), scores.numpy())

    def _require_fitted(self) -> None:
        if self.cholesky is None:
            raise ModelFileError("this PaDiM model is not fitted: call fit() or Padim.load() first")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write the model to one file atomically (:func:`utils.padim.model_file.save_state`); returns the path."""
        self._require_fitted()
        return save_state(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, settings: Settings | None = None) -> "Padim":
        """Read a model file (:func:`utils.padim.model_file.load_state`); with ``settings``, checked against them."""
        stored, mean, cholesky, record = load_state(path, settings)
        model = cls(stored)
        model.mean, model.cholesky = mean.to(model.device), cholesky.to(model.device)
        model.train_count, model.train_fingerprint = record["train_count"], record["train_fingerprint"]
        model.train_digests, model.train_kind = record["train_digests"], record["train_kind"]
        return model
