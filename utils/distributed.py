"""Multi-process fitting with ``torch.distributed`` (``torchrun``), with identical results.

``torchrun --nproc_per_node=K -m utils fit|evaluate --config config.yaml`` starts ``K`` processes; each
one reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment (:class:`DistributedContext`),
fits on its share of the training list (:func:`shard_indices`), and the per-rank streaming
statistics are summed exactly with ``all_reduce`` (:func:`all_reduce_statistics`). Rank 0 then
inverts the covariances and writes the model (``evaluate``: scores the test set and writes the
results folder); the other ranks write nothing. Without ``torchrun``
(no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) every function here is a plain single-process run.

Backend: ``nccl`` when the settings resolve to CUDA (each process then uses GPU ``LOCAL_RANK``),
``gloo`` on CPU. Collectives time out after ``PADIM_DIST_TIMEOUT`` seconds (default 600), so a
peer that hangs cannot block a run for ever.

Failures: every local step (generating a demo set, loading the data, accumulating statistics) is followed by a
collective agreement on success. If any rank failed, *every* rank raises
:class:`~utils.errors.DistributedError` naming the failing rank(s) and their error, and no model
file is written: the model is only built after all ranks reported complete statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .config import Settings
from .data import make_loader
from .data.demo import ensure_demo
from .errors import DataError, DistributedError, PadimError
from .padim import Padim
from .padim.features import resolve_device
from .padim.gaussian import GaussianStatistics

T = TypeVar("T")

#: Environment variable: seconds a collective (or the start-up rendezvous) may wait for a peer.
TIMEOUT_ENV = "PADIM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
#: Elements per all_reduce call on the scatter: bounds the backend's temporary buffers (64 MB float32).
REDUCE_CHUNK = 1 << 24


# ---------------------------------------------------------------------------- context
@dataclass
class DistributedContext:
    """Where this process stands in a (possibly single-process) run.

    Use as a context manager: on entry the process group is created when ``torchrun`` started
    several processes (``WORLD_SIZE > 1``), on exit it is destroyed again, but only if this
    context created it (a group the caller initialised is left alone).

    >>> with DistributedContext.from_settings(settings) as ctx:   # doctest: +SKIP
    ...     if ctx.is_main: ...
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def communication_device(self) -> torch.device:
        """Where collective tensors must live: the current GPU for nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}" if self.is_distributed else "single process"

    # -------------------------------------------------------------- construction
    @classmethod
    def from_settings(cls, settings: Settings, timeout_s: Optional[float] = None) -> "DistributedContext":
        """Read the torchrun environment; the backend follows the device ``settings`` resolve to.

        Nothing is initialised yet: enter the context (``with``) or call :meth:`start`.
        """
        if dist.is_available() and dist.is_initialized():
            return cls.current()
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        if world == 1:
            return cls()
        device = resolve_device(settings.device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        return cls(rank, world, local_rank, backend, _timeout(timeout_s))

    @classmethod
    def current(cls) -> "DistributedContext":
        """The process group already initialised by the caller (or a single process when none is)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, world, _env_int("LOCAL_RANK", rank), dist.get_backend(), _timeout(None), owns_group=False)

    def start(self) -> "DistributedContext":
        if not self.is_distributed:
            return self
        if not dist.is_available():
            raise DistributedError("this PyTorch build has no torch.distributed support; run a single process")
        if dist.is_initialized():
            return self
        if self.backend == "nccl":
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise DistributedError(
                    f"LOCAL_RANK {self.local_rank} but only {count} CUDA device(s) are visible; "
                    f"start at most {count} processes per node (--nproc_per_node)"
                )
            torch.cuda.set_device(self.local_rank)
        try:
            dist.init_process_group(
                self.backend, rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=self.timeout_s)
            )
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"{self.describe()}: could not join the process group ({self.backend}): {_first_line(exc)}"
            ) from exc
        self.owns_group = True
        return self

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> "DistributedContext":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -------------------------------------------------------------- agreement
    def agree(self, phase: str, action: Callable[[], T], consequence: str = "no model was written") -> T:
        """Run ``action`` here, then make every rank learn whether all ranks succeeded.

        Single process: ``action``'s own exception propagates unchanged. Several processes: if any
        rank failed, every rank raises one :class:`DistributedError` naming the failing ranks and
        their errors (the failing rank's original exception is chained on that rank).
        """
        if not self.is_distributed:
            return action()
        result, error = None, None
        try:
            result = action()
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
        failed = torch.zeros(self.world_size, dtype=torch.int32, device=self.communication_device)
        failed[self.rank] = int(error is not None)
        with self._collective(phase, consequence):
            dist.all_reduce(failed)
        failing = torch.nonzero(failed.cpu()).flatten().tolist()
        if not failing:
            return result  # type: ignore[return-value]
        reasons: list[Any] = [None] * self.world_size
        mine = f"{type(error).__name__}: {_first_line(error)}" if error is not None else None
        with self._collective(phase, consequence):
            dist.all_gather_object(reasons, mine)
        by_reason: dict[str, list[int]] = {}
        for r in failing:  # ranks that failed alike (e.g. a missing CSV) are named once
            by_reason.setdefault(reasons[r], []).append(r)
        who = f"{'rank' if len(failing) == 1 else 'ranks'} {', '.join(map(str, failing))} of {self.world_size}"
        if len(by_reason) == 1:
            detail = f": {reasons[failing[0]]}"
        else:
            detail = " (" + "; ".join(
                f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))}: {reason}" for reason, rs in by_reason.items()
            ) + ")"
        message = f"{who} failed while {phase}{detail}; the run was stopped on every rank and {consequence}"
        raise DistributedError(message) from error

    def _collective(self, phase: str, consequence: str = "no model was written") -> "_CollectiveGuard":
        return _CollectiveGuard(self, phase, consequence)


class _CollectiveGuard:
    """Turns a backend failure in a collective (a peer died, timed out) into a DistributedError."""

    def __init__(self, ctx: DistributedContext, phase: str, consequence: str):
        self.ctx, self.phase, self.consequence = ctx, phase, consequence

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and _is_communication_error(exc):
            raise DistributedError(
                f"{self.ctx.describe()}: lost contact with the other ranks while {self.phase} "
                f"(a peer crashed, was killed or exceeded the {self.ctx.timeout_s:g} s timeout set by "
                f"{TIMEOUT_ENV}): {_first_line(exc)}; {self.consequence}"
            ) from exc
        return False


def _is_communication_error(exc: BaseException) -> bool:
    """A backend or network failure (a peer gone, a timeout), as opposed to a bug in local code."""
    if isinstance(exc, PadimError) or not isinstance(exc, RuntimeError):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def _timeout(seconds: Optional[float]) -> float:
    if seconds is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None or raw == "":
            return DEFAULT_TIMEOUT_S
        try:
            seconds = float(raw)
        except ValueError:
            raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not seconds > 0:
        raise DistributedError(f"distributed timeout must be > 0 seconds, got {seconds}")
    return float(seconds)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


# ---------------------------------------------------------------------------- sharding
def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Indices of ``range(n)`` that ``rank`` of ``world`` handles: ``rank, rank + world, ...``, so
    every index is on exactly one rank and shares stay balanced when the list is ordered by source
    (e.g. IXI then fastMRI slices, whose files differ in size). Ranks beyond ``n`` get an empty shard."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"bad shard request: n={n}, rank={rank}, world={world}")
    return list(range(rank, n, world))


def shard_dataset(dataset: Dataset, ctx: DistributedContext) -> Dataset:
    """This rank's :class:`~torch.utils.data.Subset` of ``dataset`` (``dataset`` itself when alone)."""
    if not ctx.is_distributed:
        return dataset
    return Subset(dataset, shard_indices(len(dataset), ctx.rank, ctx.world_size))


# ---------------------------------------------------------------------------- statistics
def all_reduce_statistics(stats: GaussianStatistics, group: Any = None) -> GaussianStatistics:
    """Merge every rank's statistics exactly; afterwards ``stats`` holds the global ones on every rank.

    With ``n_r``, ``m_r``, ``S_r`` a rank's count, mean and scatter, and ``n = sum n_r``:

    - ``m = sum(n_r m_r) / n`` (summed in float64),
    - ``S = sum(S_r + n_r (m_r - m)(m_r - m)^T)`` - each rank adds its correction to its own
      scatter in place, then one ``all_reduce(SUM)``; no second ``(P, d, d)`` buffer is allocated.

    This is the same exact identity :meth:`GaussianStatistics.merge` uses, so the result equals a
    single-process accumulation up to floating-point rounding. Ranks with no samples contribute
    nothing. Modifies and returns ``stats``; without a process group it returns ``stats`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return stats
    comm = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    with torch.inference_mode():  # accumulate() returns inference tensors; update them in place
        return _all_reduce_statistics(stats, comm, group)


def _all_reduce_statistics(stats: GaussianStatistics, comm: torch.device, group: Any) -> GaussianStatistics:
    local_count = int(stats.count)
    if local_count < 0:
        raise PadimError("these statistics were consumed by regularised_whitening and cannot be reduced")
    count = torch.tensor([local_count], dtype=torch.float64, device=comm)
    dist.all_reduce(count, group=group)
    total = int(round(float(count.item())))
    weighted = (stats.mean.double() * local_count).to(comm)
    dist.all_reduce(weighted, group=group)
    mean = (weighted / total).to(stats.mean.device) if total else torch.zeros_like(stats.mean)
    if local_count:
        delta = (stats.mean - mean).to(stats.scatter.dtype)
        stats.scatter.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=local_count)
    _all_reduce_in_place(stats.scatter, comm, group)
    stats.count, stats.mean = total, mean.to(stats.mean.dtype)
    return stats


def _all_reduce_in_place(tensor: torch.Tensor, comm: torch.device, group: Any) -> None:
    """SUM-reduce ``tensor`` in chunks (contiguous views, reduced in place; copied only if off-device)."""
    flat = tensor.view(-1) if tensor.is_contiguous() else None
    if flat is None:
        raise PadimError("statistics tensors must be contiguous to be reduced in place")
    for chunk in flat.split(REDUCE_CHUNK):
        if chunk.device == comm:
            dist.all_reduce(chunk, group=group)
        else:
            moved = chunk.to(comm)
            dist.all_reduce(moved, group=group)
            chunk.copy_(moved)


# ---------------------------------------------------------------------------- fit
def distributed_fit(
    model: Padim,
    dataset: Dataset,
    settings: Optional[Settings] = None,
    ctx: Optional[DistributedContext] = None,
    progress: bool = True,
) -> Optional[Padim]:
    """Fit ``model`` on ``dataset`` (items: dicts with ``"image"``), each rank on its shard.

    Returns the fitted model on rank 0 (the caller saves it, e.g. with the atomic
    :meth:`Padim.save`) and ``None`` on the other ranks. ``ctx`` defaults to the process group already initialised (or a single process).
    If any rank fails while accumulating, every rank raises :class:`DistributedError` and no
    model is returned anywhere.
    """
    settings = settings or model.settings
    ctx = ctx or DistributedContext.current()
    shard = shard_dataset(dataset, ctx)
    show = progress and ctx.is_main

    stats = ctx.agree(
        "accumulating the training statistics",
        lambda: model.accumulate(make_loader(shard, settings), progress=show),
    )
    if ctx.is_distributed:
        with ctx._collective("summing the training statistics"):
            all_reduce_statistics(stats)
        if stats.count == 0:  # every rank knows the global count: all raise alike
            raise DataError("cannot fit PaDiM: the training set is empty")
    if not ctx.is_main:
        return None
    return model.fit_statistics(stats)


# ---------------------------------------------------------------------------- data
def prepare_demo(settings: Settings, ctx: DistributedContext) -> None:
    """Generate the demo set once per folder before any rank reads it: rank 0 first, then the first
    process of every other node (whose ``data.root`` may not be shared), with an agreement after each."""
    ctx.agree("generating the demo set", lambda: ctx.rank == 0 and ensure_demo(settings))
    if ctx.is_distributed:
        ctx.agree("generating the demo set", lambda: ctx.local_rank == 0 and ensure_demo(settings))
