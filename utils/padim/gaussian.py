"""Streaming per-position Gaussian statistics of patch embeddings, and their Cholesky factors.

Memory does not grow with the number of training images: each batch is folded into
``(count, mean, scatter)`` with Chan et al.'s pairwise update, where ``scatter`` is the sum of
outer products of deviations from the running mean (``n - 1`` times the sample covariance).
Every batch is centred on its own mean before its outer products are taken, and the merge adds
only the exact correction ``n_a n_b / n * delta delta^T``, so no large sums of squares cancel (the
failure of the naive ``E[xx^T] - mu mu^T`` in float32): a float32 scatter matches numpy's float64
covariance to ~1e-6 relative, at half the memory of float64 (1.2 GB for 1024 positions x 550^2).
Statistics of separate shards merge exactly by the same correction, which is what multi-process
fitting relies on (``utils.distributed.all_reduce_statistics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, PadimError


class FourthMoments:
    """Streaming per-position sums that, with :class:`GaussianStatistics`, give the Ledoit-Wolf
    coefficient: ``sum_k ||x_k - mean||^4`` needs the final mean, so the sums are kept about a
    fixed shift ``s`` (the first batch's mean, for accuracy) and expanded at the end
    (:func:`utils.padim.shrinkage.shrink_ledoit_wolf`).

    For ``y = x - s``, ``A = ||y||^2`` and ``u = mean - s``:
    ``sum ||x - mean||^4 = sum A^2 - 4 u . sum(A y) + 4 u^T scatter u + 2 |u|^2 sum A + n |u|^4``.
    All sums are float64; memory ``(P, d)``, independent of the number of images.
    """

    def __init__(self, positions: int, dim: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum_a = torch.zeros(positions, dtype=torch.float64, device=device)
        self.sum_a2 = torch.zeros(positions, dtype=torch.float64, device=device)
        self.sum_ay = torch.zeros(positions, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        """Fold in samples given position-major, ``(P, n, d)``, ``n > 0`` (:meth:`GaussianStatistics.fold`
        skips empty batches)."""
        y = rows.double()
        if self.shift is None:
            self.shift = y.mean(dim=1)
        y = y - self.shift.unsqueeze(1)
        a = y.square().sum(dim=2)  # (P, n)
        self.sum_a += a.sum(dim=1)
        self.sum_a2 += a.square().sum(dim=1)
        self.sum_ay += torch.bmm(a.unsqueeze(1), y).squeeze(1)
        self.count += rows.shape[1]


@dataclass
class GaussianStatistics:
    """Sufficient statistics of ``P`` independent ``d``-dimensional Gaussians.

    Attributes:
        count: number of samples per position folded in so far (-1 once consumed by
            :func:`regularised_cholesky`).
        mean: ``(P, d)`` float64 running mean.
        scatter: ``(P, d, d)`` sum of outer products of deviations from ``mean``.
        moments: the :class:`FourthMoments` of the same samples, for Ledoit-Wolf shrinkage
            (``covariance_shrinkage: ledoit_wolf``), else None.
    """

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor
    moments: FourthMoments | None = None

    @classmethod
    def empty(cls, positions: int, dim: int, dtype: torch.dtype = torch.float32, device="cpu",
              moments: bool = False) -> "GaussianStatistics":
        """Zero statistics; one :class:`ConfigError` naming the settings when the scatter does not fit in memory."""
        try:
            scatter = torch.zeros(positions, dim, dim, dtype=dtype, device=device)
        except (RuntimeError, MemoryError):  # torch's "[enforce fail at alloc_cpu.cpp] ...", CUDA's out of memory
            size = positions * dim * dim * dtype.itemsize
            smaller = ", or set covariance_dtype: float32" if dtype == torch.float64 else ""
            raise ConfigError(f"the covariances need {size / 2**30:.1f} GiB ({positions} positions x {dim}^2 "
                              f"channels x {dtype.itemsize} bytes) and do not fit in memory: lower image_size or "
                              f"output_dimension{smaller}") from None
        mean = torch.zeros(positions, dim, dtype=torch.float64, device=device)
        return cls(0, mean, scatter, FourthMoments(positions, dim, device) if moments else None)

    def update(self, embeddings: torch.Tensor) -> None:
        """Fold in a batch of embeddings ``(N, d, H, W)`` (``P = H * W`` positions)."""
        # (P, N, d), contiguous: the batched product on the permuted view took 2.2x as long (d = 550)
        self.fold(embeddings.flatten(2).permute(2, 0, 1).to(self.scatter.dtype, memory_format=torch.contiguous_format,
                                                            copy=True))

    def fold(self, samples: torch.Tensor) -> None:
        """Fold in samples given position-major, ``(P, n, d)`` in the scatter's dtype; ``samples``
        is consumed (centred in place).

        The batch's own scatter and the merge correction are added to ``scatter`` in place: no
        second ``(P, d, d)`` buffer is allocated, so the fit's memory stays at one scatter.
        """
        n_b = samples.shape[1]
        if n_b == 0:
            return
        if self.moments is not None:
            self.moments.update(samples)
        batch_mean = samples.mean(dim=1)
        samples -= batch_mean.unsqueeze(1)
        n_a, n = self.count, self.count + n_b
        delta = batch_mean.double() - self.mean  # (P, d) float64
        self.scatter.baddbmm_(samples.mT, samples)
        if n_a:
            d = delta.to(self.scatter.dtype)
            self.scatter.baddbmm_(d.unsqueeze(2), d.unsqueeze(1), alpha=n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n


class SampleBuffer:
    """Collects the samples of several batches and folds them into ``stats`` ``capacity`` per
    position at a time.

    Every fold reads and writes the whole ``(P, d, d)`` scatter, whatever the number of samples, so
    with the 32 images of one batch a fit at d = 550 waited on that memory traffic: on the 2-core
    machine the update of 711 images took 8.9 s in folds of 32 samples, 5.4 s of 64, 3.9 s of 128,
    3.2 s of 256. 128 samples cost ``128 / d`` of the scatter's memory (a quarter at d = 550).
    Call :meth:`flush` after the last batch.
    """

    def __init__(self, stats: GaussianStatistics, capacity: int = 128):
        positions, dim = stats.mean.shape
        self.stats = stats
        self.rows = torch.empty(positions, capacity, dim, dtype=stats.scatter.dtype, device=stats.scatter.device)
        self.filled = 0

    def add(self, embeddings: torch.Tensor) -> None:
        """Buffer ``(N, d, H, W)`` embeddings, folding whenever the buffer is full."""
        samples = embeddings.flatten(2).permute(2, 0, 1)  # (P, N, d), a view
        capacity = self.rows.shape[1]
        while samples.shape[1]:
            take = min(capacity - self.filled, samples.shape[1])
            self.rows[:, self.filled : self.filled + take] = samples[:, :take]
            self.filled += take
            samples = samples[:, take:]
            if self.filled == capacity:
                self.flush()

    def flush(self) -> GaussianStatistics:
        """Fold what is buffered; returns the statistics."""
        self.stats.fold(self.rows[:, : self.filled])
        self.filled = 0
        return self.stats


def pool_neighbourhoods(stats: GaussianStatistics, height: int, width: int, radius: int) -> GaussianStatistics:
    """Statistics of every position pooled with its neighbours within ``radius`` grid cells.

    The result at position ``p`` is exactly what streaming the samples of all positions ``q``
    with ``|q - p| <= radius`` (per axis) into ``p`` would give: the merge of equal-count shards,
    mean of the neighbour means and ``sum_q S_q + n sum_q (m_q - m)(m_q - m)^T``. With ``k``
    neighbours that is ``k n`` samples instead of ``n``. Border positions have fewer neighbours:
    their scatter is rescaled so that dividing by the common ``count - 1`` gives their own sample
    covariance. ``stats`` is left unchanged.

    Args:
        stats: ``P = height * width`` positions in row-major order.
    """
    if radius <= 0:
        return stats
    positions, dim = stats.mean.shape
    n = stats.count
    means = stats.mean.view(height, width, dim)
    scatters = stats.scatter.view(height, width, dim, dim)
    # Per neighbour offset (dy, dx): target rows/columns p and source rows/columns p + (dy, dx) that exist.
    windows = [
        (slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx)),
         slice(max(0, dy), height - max(0, -dy)), slice(max(0, dx), width - max(0, -dx)))
        for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
    ]
    neighbours = torch.zeros(height, width, dtype=torch.float64, device=stats.mean.device)
    pooled_mean = torch.zeros_like(means)
    for ty, tx, sy, sx in windows:
        neighbours[ty, tx] += 1
        pooled_mean[ty, tx] += means[sy, sx]
    pooled_mean /= neighbours.unsqueeze(-1)
    scatter = torch.zeros_like(scatters)
    for ty, tx, sy, sx in windows:
        scatter[ty, tx] += scatters[sy, sx]
        spread = (means[sy, sx] - pooled_mean[ty, tx]).to(scatter.dtype)  # (h', w', d)
        for row, target in zip(spread, scatter[ty, tx]):  # one grid row at a time: no (h', w', d, d) temporary
            target.baddbmm_(row.unsqueeze(2), row.unsqueeze(1), alpha=n)
    total = n * len(windows)
    scale = (total - 1) / (n * neighbours - 1).clamp_min(1)
    scatter *= scale.to(scatter.dtype)[..., None, None]
    return GaussianStatistics(total, pooled_mean.reshape(positions, dim), scatter.view(positions, dim, dim))


def regularised_cholesky(stats: GaussianStatistics, epsilon: float, chunk: int = 64) -> torch.Tensor:
    """Lower Cholesky factors ``L`` of ``covariance + epsilon * I = L L^T`` for every position.

    Returns ``(P, d, d)`` lower-triangular matrices. The Mahalanobis distance is ``||L^-1 (x - mean)||``,
    one triangular solve per position (:func:`utils.padim.scoring.mahalanobis`): a sum of squares,
    which cannot cancel where ``x^T P x`` can, and no inverse is formed. Forming ``L^-1`` took twice
    as long as the factorisation itself (d = 550) and made scoring no faster: a triangular solve
    costs what a product with ``L^-1`` costs. ``torch.linalg.inv`` is not used: on batches of large
    matrices it was seen to fail, and once to return a silently wrong inverse, on CPU (pytorch
    #142815); Cholesky is correct for these symmetric positive definite matrices and reports failure.
    Positions are factorised ``chunk`` at a time, which bounds the temporaries.

    With fewer samples than dimensions the covariance is singular, epsilon sets its smallest
    eigenvalues and the condition number is ~ largest variance / epsilon: such matrices are
    factorised in float64. Otherwise the scatter's dtype is used (float32: distances within ~2e-5
    of a float64 reference on real wide_resnet50_2 features, checked by ``bench/run.py``). The
    scatter buffer receives the result (the fit's peak memory stays at one ``(P, d, d)`` buffer):
    ``stats`` is consumed.
    """
    count = stats.count  # > 0: Padim.fit_statistics refuses an empty training set
    if count < 0:
        raise PadimError("these statistics were consumed by regularised_cholesky")
    stats.count = -1  # the scatter buffer receives the result, even if a position fails part-way: no reuse
    positions, dim, _ = stats.scatter.shape
    work_dtype = torch.float64 if count - 1 < dim else stats.scatter.dtype
    for start in range(0, positions, chunk):
        covariance = stats.scatter[start : start + chunk].to(work_dtype) / max(count - 1, 1)
        covariance.diagonal(dim1=1, dim2=2).add_(epsilon)
        factor, info = torch.linalg.cholesky_ex(covariance)
        if bool((info != 0).any()):
            bad = start + int(torch.nonzero(info)[0])
            raise PadimError(
                f"covariance at position {bad} is not positive definite even with epsilon={epsilon}; "
                "check the input images and the backbone's weights, or raise `epsilon`"
            )
        stats.scatter[start : start + chunk] = factor
    return stats.scatter


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, checked on the sums over the last two axes: NaN and Inf
    propagate through a sum, and ``torch.isfinite`` of a whole (P, d, d) stack would allocate
    temporaries of ~1.5 times its size (1.9 GB for 1024 x 550^2 float32). Values that overflow
    only when summed (beyond ~1e38 / d^2) would be reported too."""
    sums = tensor.sum(dim=(-2, -1)) if tensor.ndim >= 2 else tensor.sum()
    return bool(torch.isfinite(sums).all())
