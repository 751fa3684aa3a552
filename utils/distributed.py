"""Multi-process fitting with ``torch.distributed`` (``torchrun``), with identical results.

``torchrun --nproc_per_node=K -m utils fit|evaluate --config config.yaml`` starts ``K`` processes; each
one reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment (:class:`DistributedContext`),
fits on its share of the training list (:func:`shard_dataset`), and the per-rank streaming
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

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .config import Settings
from .data import Loader
from .data.demo import ensure_demo
from .errors import DistributedError, PadimError, first_line
from .padim import Padim
from .padim.features import resolve_device
from .padim.gaussian import GaussianStatistics

T = TypeVar("T")

#: Environment variable: seconds a collective (or the start-up rendezvous) may wait for a peer.
TIMEOUT_ENV = "PADIM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
#: Elements per all_reduce call on the scatter: bounds the backend's temporary buffers (64 MB float32).
REDUCE_CHUNK = 1 << 24


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

    @classmethod
    def from_settings(cls, settings: Settings) -> "DistributedContext":
        """Read the torchrun environment; the backend follows the device ``settings`` resolve to.
        Nothing is initialised until the context is entered (``with``)."""
        world, rank = _env_number("WORLD_SIZE", 1), _env_number("RANK", 0)
        if rank >= world:  # both are integers >= 0 (_env_number): this also refuses WORLD_SIZE=0
            raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        if world == 1:
            return cls()
        backend = "nccl" if resolve_device(settings.device).type == "cuda" else "gloo"
        return cls(rank, world, _env_number("LOCAL_RANK", rank), backend,
                   _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float))

    def __enter__(self) -> "DistributedContext":
        if not self.is_distributed or dist.is_initialized():
            return self
        if self.backend == "nccl":
            if self.local_rank >= (count := torch.cuda.device_count()):
                raise DistributedError(f"LOCAL_RANK {self.local_rank} but only {count} CUDA device(s) are visible; "
                                       f"start at most {count} processes per node (--nproc_per_node)")
            torch.cuda.set_device(self.local_rank)
        try:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=timedelta(seconds=self.timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {self.rank} of {self.world_size}: could not join the process group "
                                   f"({self.backend}): {first_line(exc)}") from exc
        self.owns_group = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def agree(self, phase: str, action: Callable[[], T]) -> T:
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
        reasons: list[Any] = [None] * self.world_size
        with self.collective(phase):
            dist.all_gather_object(reasons, None if error is None else f"{type(error).__name__}: {first_line(error)}")
        if not any(reasons):
            return result  # type: ignore[return-value]
        # ranks that failed alike (e.g. a missing CSV) are named once
        failed = {why: [rank for rank, other in enumerate(reasons) if other == why] for why in reasons if why}
        who = "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} of {self.world_size} "
                        f"failed while {phase}: {why}" for why, ranks in failed.items())
        raise DistributedError(f"{who}; the run was stopped on every rank and no model was written") from error

    @contextlib.contextmanager
    def collective(self, phase: str) -> Iterator[None]:
        """Turns a backend failure in a collective (a peer died, timed out) into a DistributedError."""
        try:
            yield
        except RuntimeError as exc:
            if not _is_communication_error(exc):
                raise
            raise DistributedError(f"rank {self.rank} of {self.world_size}: lost contact with the other ranks while "
                                   f"{phase} (a peer crashed, was killed or exceeded the {self.timeout_s:g} s timeout "
                                   f"set by {TIMEOUT_ENV}): {first_line(exc)}; no model was written") from exc


def _is_communication_error(exc: RuntimeError) -> bool:
    """A backend or network failure (a peer gone, a timeout), as opposed to a bug in local code;
    gloo reports a peer's end as a plain RuntimeError."""
    text = str(exc).lower()
    words = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")
    return isinstance(exc, dist.DistError) or (not isinstance(exc, PadimError) and any(word in text for word in words))


def _env_number(name: str, default: float, kind: type = int) -> Any:
    """The environment variable ``name`` (``default`` when it is not set): an integer >= 0, or with
    ``kind`` float a number of seconds > 0."""
    raw = os.environ.get(name) or str(default)
    with contextlib.suppress(ValueError):
        if (value := kind(raw)) > 0 or (value == 0 and kind is int):
            return value
    allowed = "an integer >= 0" if kind is int else "a number of seconds > 0"
    raise DistributedError(f"environment variable {name}={raw!r}; allowed: {allowed}")


def shard_dataset(dataset: Dataset, ctx: DistributedContext) -> Dataset:
    """This rank's :class:`~torch.utils.data.Subset` of ``dataset`` (``dataset`` itself when alone):
    items ``rank, rank + world, ...``, so every item is on exactly one rank and shares stay balanced
    when the list is ordered by source (e.g. IXI then fastMRI slices, whose files differ in size).
    Ranks beyond the length get an empty shard."""
    return Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)) if ctx.is_distributed else dataset


def all_reduce_statistics(stats: GaussianStatistics) -> GaussianStatistics:
    """Merge every rank's statistics exactly; afterwards ``stats`` holds the global ones on every rank.

    With ``n_r``, ``m_r``, ``S_r`` a rank's count, mean and scatter, and ``n = sum n_r``:

    - ``m = sum(n_r m_r) / n`` (summed in float64),
    - ``S = sum(S_r + n_r (m_r - m)(m_r - m)^T)`` - each rank adds its correction to its own
      scatter in place, then one ``all_reduce(SUM)``, in chunks; no second ``(P, d, d)`` buffer is allocated.

    This is Chan et al.'s exact merge of the streaming update (:mod:`utils.padim.gaussian`), so the
    result equals a single-process accumulation up to floating-point rounding. Ranks with no samples contribute
    nothing. The statistics live on the device the backend reduces on (the settings' device picks
    both). Needs the process group; modifies and returns ``stats``.
    """
    with torch.inference_mode():  # accumulate() returns inference tensors; update them in place
        local = int(stats.count)
        count = torch.tensor([local], dtype=torch.int64, device=stats.mean.device)
        dist.all_reduce(count)
        weighted = stats.mean.double() * local
        dist.all_reduce(weighted)
        total = int(count.item())
        mean = weighted / total if total else torch.zeros_like(weighted)
        if local:
            delta = (stats.mean - mean).to(stats.scatter.dtype)
            stats.scatter.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=local)
        for chunk in stats.scatter.view(-1).split(REDUCE_CHUNK):  # views: reduced in place
            dist.all_reduce(chunk)
        stats.count, stats.mean = total, mean.to(stats.mean.dtype)
    return stats


def distributed_fit(model: Padim, dataset: Dataset, ctx: DistributedContext, progress: bool = True) -> Optional[Padim]:
    """Fit ``model`` on ``dataset`` (items: dicts with ``"image"``), each rank on its shard.

    Returns the fitted model on rank 0 (the caller saves it, e.g. with the atomic
    :meth:`Padim.save`) and ``None`` on the other ranks. If any rank fails while accumulating,
    every rank raises :class:`DistributedError` and no model is returned anywhere.
    """
    loader = Loader(shard_dataset(dataset, ctx), model.settings)
    shown = progress and ctx.is_main
    stats = ctx.agree("accumulating the training statistics", lambda: model.accumulate(loader, progress=shown))
    if ctx.is_distributed:
        with ctx.collective("summing the training statistics"):
            all_reduce_statistics(stats)
    # every rank knows the global count: an empty training set fails in fit_statistics on all ranks alike
    return model.fit_statistics(stats) if ctx.is_main or stats.count == 0 else None


def prepare_demo(settings: Settings, ctx: DistributedContext) -> None:
    """Generate the demo set once per folder before any rank reads it: rank 0 first, then the first
    process of every other node (whose ``data.root`` may not be shared), with an agreement after each."""
    ctx.agree("generating the demo set", lambda: ctx.rank == 0 and ensure_demo(settings))
    ctx.agree("generating the demo set", lambda: ctx.local_rank == 0 and ensure_demo(settings))  # alone: finds it
