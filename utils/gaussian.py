"""Streaming per-position Gaussian statistics: mean and covariance of patch embeddings.

Memory does not grow with the number of training images: each batch is folded into
``(count, mean, scatter)`` with Chan et al.'s pairwise update, where ``scatter`` is the sum of
outer products of deviations from the running mean (n - 1 times the sample covariance).

Precision: the mean is kept in float64; the scatter in ``dtype`` (float32 by default). Because
every batch is centred on its own mean before its outer products are taken, and the merge adds
only the exact correction ``n_a n_b / n * delta delta^T``, no large sums of squares are
subtracted from each other (the cancellation that ruins the naive ``E[xx^T] - mu mu^T`` in
float32). A float32 scatter therefore matches numpy's float64 covariance to ~1e-6 relative
(tested), at half the memory of float64: 1.2 GB instead of 2.5 GB for 1024 positions x 550^2.

Statistics from separate shards merge exactly with :meth:`GaussianStatistics.merge`, in any
order, which is what multi-process fitting relies on.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from dataclasses import dataclass, field

import torch

from .errors import PadimError


#: Up to this dimension, and while a fit has fewer than twice as many samples as dimensions,
#: a fold forms its product in float64 (see ``fold_rows``).
FLOAT64_PRODUCT_MAX_DIM = 128
#: From this dimension up a ``lower_only`` fold uses ``?syrk``; below it one batched product of
#: the full matrices is faster (per-position BLAS calls cost more than the flops they save:
#: measured on 2 cores, d = 176: syrk 0.40-0.67 s vs bmm 0.27 s per 320 images; d = 384 about
#: equal; d = 550: syrk 1.1 s vs bmm 2.1-2.5 s per 198 images).
SYRK_MIN_DIM = 400
#: From this dimension up, CPU factorisations call SciPy's LAPACK (see ``regularised_whitening``);
#: below it torch's batched routines are as fast, and skip importing ``scipy.linalg`` (0.2-0.3 s
#: per process). Measured for 1024 positions on 2 cores, torch vs SciPy (import excluded):
#: d = 100: 0.22 vs 0.20 s; d = 128: 0.30 vs 0.21 s; d = 176: 0.49 vs 0.35 s; d = 256: 1.25 vs 0.78 s.
SCIPY_LAPACK_MIN_DIM = 160
#: Positions per task when work on ``(P, d, d)`` buffers is shared among threads.
POSITION_TASK = 64


@dataclass
class GaussianStatistics:
    """Sufficient statistics of ``P`` independent ``d``-dimensional Gaussians.

    Attributes:
        count: number of samples per position folded in so far.
        mean: ``(P, d)`` float64 running mean.
        scatter: ``(P, d, d)`` sum of outer products of deviations from ``mean``.
    """

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor
    #: True while only the lower triangle of ``scatter`` is up to date (inside a fit, after
    #: ``fold_rows(..., lower_only=True)``); :meth:`symmetrise` completes it.
    lower_only: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def empty(cls, positions: int, dim: int, dtype: torch.dtype = torch.float32, device="cpu") -> "GaussianStatistics":
        return cls(
            0,
            torch.zeros(positions, dim, dtype=torch.float64, device=device),
            torch.zeros(positions, dim, dim, dtype=dtype, device=device),
        )

    def update(self, embeddings: torch.Tensor) -> None:
        """Fold in a batch of embeddings ``(N, d, H, W)`` (``P = H * W`` positions)."""
        n_b = embeddings.shape[0]
        if n_b == 0:
            return
        positions, dim = self.mean.shape
        # One copy into a position-major work buffer (P, N + 1, d): it converts the dtype, makes
        # every position's (N, d) matrix contiguous (free when the embeddings come from
        # PatchEmbedder, which stores them position-major) and leaves a spare row for the merge.
        work = torch.empty(positions, n_b + 1, dim, dtype=self.scatter.dtype, device=self.scatter.device)
        work[:, :n_b].copy_(embeddings.flatten(2).permute(2, 0, 1))
        self.fold_rows(work, n_b)

    def fold_rows(self, work: torch.Tensor, n_b: int, lower_only: bool = False) -> None:
        """Fold in ``n_b`` samples given position-major, overwriting ``work`` (the fast path of a fit).

        ``work`` is ``(P, >= n_b + 1, d)`` in the dtype of ``scatter``, rows ``[:n_b]`` the samples
        of every position, row ``n_b`` spare. The rows are centred on the batch mean in place and
        row ``n_b`` receives ``sqrt(n_a n_b / n) * delta``, so one product ``work^T work`` per
        position adds both the batch scatter and Chan's merge correction: the ``(P, d, d)``
        scatter is read and written once per call, and no ``(P, d, d)`` temporary is made.

        With ``lower_only``, ``d >= SYRK_MIN_DIM`` and SciPy's BLAS available, that product is a
        symmetric rank-k update (``?syrk``) of the lower triangle only: half the arithmetic and
        half the scatter traffic of a full product, ~2x faster for d = 550. ``lower_only`` then
        stays set until :meth:`symmetrise`; :func:`regularised_whitening` reads only the lower
        triangle.
        """
        if n_b == 0:
            return
        rows = work[:, :n_b]
        batch_mean = rows.sum(dim=1).div_(n_b)  # (P, d) in the scatter dtype
        rows.sub_(batch_mean.unsqueeze(1))
        n_a = self.count
        n = n_a + n_b
        delta = batch_mean.double() - self.mean  # (P, d) float64
        if n_a:
            work[:, n_b].copy_(delta * math.sqrt(n_a * n_b / n))
            used = work[:, : n_b + 1]
        else:
            used = rows
        dim = self.scatter.shape[-1]
        if self.scatter.dtype == torch.float32 and dim <= FLOAT64_PRODUCT_MAX_DIM and n < 2 * dim:
            # Few samples for the dimension: the covariance is ill-conditioned (epsilon sets its
            # smallest eigenvalues), and a float32 product's own accumulation error moved such
            # maps by ~2e-4; here the product is formed in float64 and rounded once into the
            # scatter. With more samples a float32 product is as accurate as the float32 scatter
            # itself (efficientnet_lite0, d = 100, 711 images: 1.9e-5 vs 1.6e-5 from the float64
            # reference) and ~2.5x faster (0.26 vs 0.6 s per 711 images).
            for start in range(0, used.shape[0], 32):
                part = used[start : start + 32].double()
                self.scatter[start : start + 32].add_(torch.bmm(part.transpose(1, 2), part))
        elif lower_only and dim >= SYRK_MIN_DIM and _syrk_possible(self.scatter, used):
            _syrk_lower(self.scatter, used)
            self.lower_only = True
        else:
            self.scatter.baddbmm_(used.transpose(1, 2), used)
        self.mean.add_(delta, alpha=n_b / n)
        self.count = n

    def symmetrise(self) -> None:
        """Complete ``scatter`` from its lower triangle after ``fold_rows(..., lower_only=True)``."""
        if not self.lower_only:
            return
        starts = range(0, self.scatter.shape[0], POSITION_TASK)
        _for_each(lambda start: _mirror_lower(self.scatter[start : start + POSITION_TASK]), starts,
                  threaded=self.scatter.device.type == "cpu")
        self.lower_only = False

    def merge(self, other: "GaussianStatistics") -> None:
        """Fold in statistics of another shard, as if its samples had been seen here."""
        if other.mean.shape != self.mean.shape:
            raise PadimError(f"cannot merge statistics of shape {tuple(other.mean.shape)} into {tuple(self.mean.shape)}")
        if other.count == 0:
            return
        other.symmetrise()
        self.symmetrise()
        if self.count == 0:
            self.count, self.mean, self.scatter = other.count, other.mean.clone(), other.scatter.clone()
            return
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean - self.mean  # (P, d) float64
        self.scatter.add_(other.scatter.to(self.scatter.dtype))
        d = delta.to(self.scatter.dtype)
        self.scatter.baddbmm_(d.unsqueeze(2), d.unsqueeze(1), alpha=n_a * n_b / n)
        self.mean.add_(delta, alpha=n_b / n)
        self.count = n

    def covariance(self) -> torch.Tensor:
        """Sample covariance ``(P, d, d)`` (divisor ``n - 1``; ``1`` when ``n = 1``)."""
        self.symmetrise()
        return self.scatter / max(self.count - 1, 1)


def pool_neighbourhoods(stats: GaussianStatistics, height: int, width: int, radius: int) -> GaussianStatistics:
    """Statistics of every position pooled with its neighbours within ``radius`` grid cells.

    The result at position ``p`` is exactly what streaming the samples of all positions ``q``
    with ``|q - p| <= radius`` (per axis) into ``p`` would give: mean of the neighbour means, and
    ``sum_q S_q + n sum_q (m_q - m)(m_q - m)^T`` (the merge of equal-count shards). With ``k``
    neighbours that is ``k n`` samples instead of ``n``, e.g. 9 x 130 for ``radius`` 1, more than
    the 176 dimensions of efficientnet_lite0; it also tolerates slices that are not perfectly
    aligned. Border positions have fewer neighbours: their scatter is rescaled so that dividing
    by the common ``count - 1`` gives their own sample covariance. ``stats`` is left unchanged.

    Args:
        stats: ``P = height * width`` positions in row-major order.
    """
    if radius <= 0:
        return stats
    stats.symmetrise()
    positions, dim = stats.mean.shape
    if positions != height * width:
        raise PadimError(f"statistics hold {positions} positions, not a {height} x {width} grid")
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
    scatter = torch.zeros_like(stats.scatter).view(height, width, dim, dim)
    for ty, tx, sy, sx in windows:
        scatter[ty, tx] += scatters[sy, sx]
        spread = (means[sy, sx] - pooled_mean[ty, tx]).to(scatter.dtype)  # (h', w', d)
        for row, target in zip(spread, scatter[ty, tx]):  # one grid row at a time: no (h', w', d, d) temporary
            target.baddbmm_(row.unsqueeze(2), row.unsqueeze(1), alpha=n)
    total = n * len(windows)
    # k n samples at a border position, k < len(windows): scale its scatter to the common count.
    scale = (total - 1) / (n * neighbours - 1).clamp_min(1)
    scatter *= scale.to(scatter.dtype)[..., None, None]
    return GaussianStatistics(total, pooled_mean.reshape(positions, dim), scatter.view(positions, dim, dim))


def regularised_precision(
    stats: GaussianStatistics, epsilon: float, chunk: int = 64, in_place: bool = False
) -> torch.Tensor:
    """Inverse of ``covariance + epsilon * I`` for every position, through Cholesky: ``(P, d, d)``.

    The same factorisation as :func:`regularised_whitening` (see there for accuracy, memory
    and threading), then the inverse from the factor (``?potri``). A fitted model stores the
    whitening matrices instead, which skips a third of this work.
    """
    return _regularised(stats, epsilon, chunk, in_place, whitening=False)


def regularised_whitening(
    stats: GaussianStatistics, epsilon: float, chunk: int = 64, in_place: bool = False
) -> torch.Tensor:
    """Whitening matrices ``W = L^-1`` of ``covariance + epsilon * I = L L^T`` for every position.

    Returns ``(P, d, d)`` lower-triangular matrices (zero above the diagonal) with ``W^T W`` the
    precision: the Mahalanobis distance is ``||W (x - mean)||`` (:func:`utils.scoring.mahalanobis`).
    Computing ``W`` costs ``?potrf`` + ``?trtri`` (2/3 d^3 flops), the precision ``?potrf`` +
    ``?potri`` (d^3): 3.2 s instead of 4.0 s for 1024 positions with d = 550 on 2 cores.
    A sum of squares also cannot cancel, where ``x^T P x`` can.

    ``torch.linalg.inv`` on batches of large matrices was seen to fail, and once to return a
    silently wrong inverse, on CPU with several threads (MKL ``?LASWP`` errors; pytorch #142815).
    Cholesky is correct, faster for symmetric positive definite matrices, and reports failure.

    Each chunk of positions is factorised in the dtype of the scatter. For float32 (the
    default) the distances computed from the result match a float64 reference (``np.cov``,
    ``np.linalg.inv``, SciPy's ``mahalanobis``) to ~2e-5 relative on real wide_resnet50_2
    features with d = 550 and 711 images (condition numbers up to ~4e5); ``bench/run.py``
    checks this on every run. Ill-conditioned covariances (fewer samples than dimensions, where
    the condition number is ~ largest variance / epsilon) are factorised and inverted in float64.
    With ``in_place`` the scatter buffer is overwritten with the result, which keeps the peak
    memory of a fit at one ``(P, d, d)`` buffer; ``stats`` is then consumed. Only the lower
    triangle of the scatter is read, so a scatter folded with ``lower_only`` needs no
    :meth:`~GaussianStatistics.symmetrise` first.

    On CPU the chunks are shared among ``torch.get_num_threads()`` Python threads, each
    running single-threaded LAPACK (multi-threaded MKL Cholesky on 550 x 550 matrices was 10-40x
    slower on a 2-core machine shared with other processes). Where SciPy exposes its LAPACK
    (``scipy.linalg.cython_lapack``, OpenBLAS) it is called directly for ``d >=
    SCIPY_LAPACK_MIN_DIM``, matrix by matrix, without copies: ~1.8x faster than torch's (MKL) on
    AMD EPYC for d = 550; otherwise (small d, no SciPy, and on CUDA) ``torch.linalg.cholesky_ex``
    and ``torch.linalg.solve_triangular`` are used.
    """
    return _regularised(stats, epsilon, chunk, in_place, whitening=True)


def _regularised(stats: GaussianStatistics, epsilon: float, chunk: int, in_place: bool, whitening: bool) -> torch.Tensor:
    if stats.count == 0:
        raise PadimError("no training samples were accumulated: the training set is empty")
    if stats.count < 0:
        raise PadimError("these statistics were consumed by an in-place regularised_whitening")
    positions, dim, _ = stats.scatter.shape
    out = stats.scatter if in_place else torch.empty_like(stats.scatter)
    scale = 1.0 / max(stats.count - 1, 1)
    starts = range(0, positions, chunk)
    on_cpu = stats.scatter.device.type == "cpu"
    lapack = _routines() if on_cpu and out.is_contiguous() and dim >= SCIPY_LAPACK_MIN_DIM else None
    finish = _whiten_lower if whitening else _invert_lower

    # Fewer samples than dimensions: the covariance is singular, epsilon sets its smallest
    # eigenvalues and the condition number is ~ largest variance / epsilon. Factorising such
    # matrices in float32 moved distances by up to ~1e-3, so there the factor and its inverse
    # are computed in float64 (~1.7x the time of float32 for d = 550). Otherwise float32 was
    # accurate (~2e-5 on the distances, see above).
    work_dtype = torch.float64 if stats.count - 1 < dim else out.dtype

    def invert(start: int) -> None:
        block = out[start : start + chunk]
        bad = None
        if work_dtype == out.dtype:
            block.copy_(stats.scatter[start : start + chunk]).mul_(scale)
            block.diagonal(dim1=1, dim2=2).add_(epsilon)
            bad = _factor(block, lapack)
            if bad is None:
                finish(block, lapack)
        else:
            # In float64, FACTOR_CHUNK matrices at a time through one small reused buffer,
            # written back into the output rows.
            buffer = torch.empty((min(FACTOR_CHUNK, block.shape[0]), dim, dim), dtype=work_dtype, device=block.device)
            for sub in range(0, block.shape[0], FACTOR_CHUNK):
                rows = slice(start + sub, start + min(sub + FACTOR_CHUNK, block.shape[0]))
                covariance = buffer[: rows.stop - rows.start]
                covariance.copy_(stats.scatter[rows]).mul_(scale)
                covariance.diagonal(dim1=1, dim2=2).add_(epsilon)
                failed = _factor(covariance, lapack)
                if failed is not None:
                    bad = sub + failed
                    break
                finish(covariance, lapack)
                out[rows] = covariance
            del buffer
        if bad is not None:
            if in_place:
                stats.count = -1  # part of the scatter is overwritten already
            raise PadimError(
                f"covariance at position {start + bad} is not positive definite even with epsilon={epsilon} "
                "(non-finite features?); check the input images or raise `epsilon`"
            )

    with _blas_single_threaded() if lapack is not None else contextlib.nullcontext():
        _for_each(invert, starts, threaded=on_cpu)
    if in_place:
        stats.count = -1  # the scatter is gone: guard against reuse
    return out


def _invert_lower(block: torch.Tensor, routines: dict | None) -> None:
    """The inverse (symmetric, full) from the Cholesky factor in the lower triangle of every matrix, in place."""
    if routines is None:
        torch.cholesky_inverse(block.tril(), out=block)
    else:
        _potri_lower(block, routines)


def _whiten_lower(block: torch.Tensor, routines: dict | None) -> None:
    """The inverse of the Cholesky factor in the lower triangle of every matrix, in place; the
    upper triangle (still holding covariances) is zeroed."""
    dim = block.shape[-1]
    if routines is None:
        identity = torch.eye(dim, dtype=block.dtype, device=block.device).expand_as(block)
        block.copy_(torch.linalg.solve_triangular(block.tril(), identity, upper=False))
    else:
        trtri = routines[("trtri", block.dtype)]
        n, info = ctypes.c_int(dim), ctypes.c_int(0)
        for matrix in block:
            # C-contiguous lower = Fortran upper ("U"), non-unit diagonal ("N").
            trtri(b"U", b"N", ctypes.byref(n), matrix.data_ptr(), ctypes.byref(n), ctypes.byref(info))
            if info.value != 0:
                raise PadimError(f"LAPACK failed inverting a {dim} x {dim} Cholesky factor (info {info.value})")
    block.tril_()


def _factor(block: torch.Tensor, routines: dict | None) -> int | None:
    """Lower Cholesky factor of every matrix of ``block`` (only its lower triangle is read) in
    place; index of the first matrix that is not positive definite, else ``None``."""
    if routines is None:
        info = torch.empty(block.shape[0], dtype=torch.int32, device=block.device)
        torch.linalg.cholesky_ex(block, out=(block, info))
        return int(torch.nonzero(info)[0]) if bool((info != 0).any()) else None
    # A C-contiguous matrix is the Fortran-order transpose of itself: LAPACK's "U" triangle is
    # our lower one. Each call releases the GIL (ctypes), so threads factorise in parallel.
    potrf = routines[("potrf", block.dtype)]
    n, info = ctypes.c_int(block.shape[-1]), ctypes.c_int(0)
    for index, matrix in enumerate(block):
        potrf(b"U", ctypes.byref(n), matrix.data_ptr(), ctypes.byref(n), ctypes.byref(info))
        if info.value > 0:
            return index
        if info.value < 0:
            raise PadimError(f"LAPACK ?potrf refused its arguments (info {info.value})")
    return None


def _potri_lower(block: torch.Tensor, routines: dict) -> None:
    """Inverse from the Cholesky factor in the lower triangle of every matrix, in place."""
    potri = routines[("potri", block.dtype)]
    dim = block.shape[-1]
    n, info = ctypes.c_int(dim), ctypes.c_int(0)
    for matrix in block:
        potri(b"U", ctypes.byref(n), matrix.data_ptr(), ctypes.byref(n), ctypes.byref(info))
        if info.value != 0:
            raise PadimError(f"LAPACK failed inverting a {dim} x {dim} covariance (info {info.value})")
    _mirror_lower(block)


#: Tile side of :func:`_mirror_lower` (64 x 64 float32 tiles stay in L1/L2 while transposed).
MIRROR_TILE = 64


def _mirror_lower(block: torch.Tensor) -> None:
    """Copy the lower triangle of every matrix of ``block`` ``(B, d, d)`` onto its upper one,
    tile by tile (a whole-matrix transposing copy is several times slower)."""
    dim = block.shape[-1]
    edges = list(range(0, dim, MIRROR_TILE)) + [dim]
    for a in range(len(edges) - 1):
        i0, i1 = edges[a], edges[a + 1]
        tile = block[:, i0:i1, i0:i1]
        tile.copy_(tile.tril() + tile.tril(-1).mT)
        for b in range(a + 1, len(edges) - 1):
            j0, j1 = edges[b], edges[b + 1]
            block[:, i0:i1, j0:j1].copy_(block[:, j0:j1, i0:i1].mT)


def _syrk_possible(scatter: torch.Tensor, used: torch.Tensor) -> bool:
    dim = scatter.shape[-1]
    return (
        scatter.device.type == "cpu" and scatter.dtype in (torch.float32, torch.float64) and used.dtype == scatter.dtype
        and scatter.is_contiguous() and used.stride(-1) == 1 and used.stride(-2) == dim and _routines() is not None
    )


def _syrk_lower(scatter: torch.Tensor, used: torch.Tensor) -> None:
    """``scatter[p] += used[p]^T used[p]`` on the lower triangle, position by position (``?syrk``),
    on ``torch.get_num_threads()`` threads with single-threaded BLAS."""
    routines = _routines()
    syrk = routines[("syrk", scatter.dtype)]
    scalar = ctypes.c_float if scatter.dtype == torch.float32 else ctypes.c_double
    one = scalar(1.0)
    positions, rank, dim = used.shape

    def task(start: int) -> None:
        n, k = ctypes.c_int(dim), ctypes.c_int(rank)
        # Fortran view: C (d x d, "U" = our lower) += A A^T with A = used[p]^T (d x k, lda = d).
        for p in range(start, min(start + POSITION_TASK, positions)):
            syrk(b"U", b"N", ctypes.byref(n), ctypes.byref(k), ctypes.addressof(one), used[p].data_ptr(),
                 ctypes.byref(n), ctypes.addressof(one), scatter[p].data_ptr(), ctypes.byref(n))

    with _blas_single_threaded():
        _for_each(task, range(0, positions, POSITION_TASK), threaded=True)


#: Matrices per float64 factorisation step: bounds its buffer (16 x 550^2 x 8 B = 39 MB per thread).
FACTOR_CHUNK = 16
_ROUTINES: dict = {}


def _routines() -> dict | None:
    """SciPy's BLAS/LAPACK (``?syrk``, ``?potrf``, ``?potri``, ``?trtri``; OpenBLAS in SciPy's wheels) as
    ctypes functions keyed by ``(name, dtype)``, or ``None`` when unavailable, in which case
    torch's own routines are used. They come from ``scipy.linalg.cython_blas`` /
    ``cython_lapack``, SciPy's documented low-level interface (numba binds them the same way);
    ctypes calls release the GIL, so threads run them in parallel on separate matrices.
    ``PADIM_TORCH_LAPACK=1`` in the environment disables them.
    """
    if "value" not in _ROUTINES:
        _ROUTINES["value"] = None if os.environ.get("PADIM_TORCH_LAPACK") else _load_routines()
    return _ROUTINES["value"]


def _load_routines() -> dict | None:
    try:
        import threadpoolctl  # noqa: F401 - keeps SciPy's BLAS single-threaded inside our threads
        from scipy.linalg import cython_blas, cython_lapack
    except ImportError:
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    int_p = ctypes.POINTER(ctypes.c_int)
    lapack_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, int_p, ctypes.c_void_p, int_p, int_p)
    trtri_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, int_p, ctypes.c_void_p, int_p, int_p)
    syrk_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, int_p, int_p, ctypes.c_void_p,
                                 ctypes.c_void_p, int_p, ctypes.c_void_p, ctypes.c_void_p, int_p)
    # Only the LP64 signatures SciPy documents (32-bit ints), checked against the capsule's.
    wanted = {
        "potrf": (cython_lapack, lapack_type, b"void (char *, int *,", b"*, int *, int *)"),
        "potri": (cython_lapack, lapack_type, b"void (char *, int *,", b"*, int *, int *)"),
        "trtri": (cython_lapack, trtri_type, b"void (char *, char *, int *,", b"*, int *, int *)"),
        "syrk": (cython_blas, syrk_type, b"void (char *, char *, int *, int *,", b"*, int *)"),
    }
    routines = {}
    for name, (module, function_type, starts, ends) in wanted.items():
        for prefix, dtype in (("s", torch.float32), ("d", torch.float64)):
            capsule = getattr(module, "__pyx_capi__", {}).get(prefix + name)
            declared = get_name(capsule) if capsule is not None else None
            if not declared or not (declared.startswith(starts) and declared.endswith(ends)):
                return None
            routines[(name, dtype)] = function_type(get_pointer(capsule, declared))
    return routines


@contextlib.contextmanager
def _blas_single_threaded():
    """SciPy's BLAS single-threaded while our own threads share the work."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _for_each(function, items, threaded: bool) -> None:
    """``function(item)`` for every item: on ``torch.get_num_threads()`` Python threads when
    ``threaded`` (CPU work) and there is more than one item and thread, else in a plain loop."""
    workers = min(torch.get_num_threads(), len(items)) if threaded else 1
    if workers > 1:
        _run_single_threaded(function, items, workers)
    else:
        for item in items:
            function(item)


def _run_single_threaded(function, items, workers: int) -> None:
    """``function(item)`` for every item on ``workers`` Python threads, torch single-threaded.

    torch releases the GIL inside its kernels, so the threads run in parallel. Inference mode
    (thread-local) is carried over, the previous thread count is restored afterwards, and the
    first exception is re-raised.
    """
    from concurrent.futures import ThreadPoolExecutor

    inference = torch.is_inference_mode_enabled()  # thread-local: carry it into the workers

    def run(item) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            function(item)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(run, item) for item in items]:
                future.result()
    finally:
        torch.set_num_threads(previous)
