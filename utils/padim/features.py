"""Patch embeddings: backbone stage maps on the stride-4 grid, with seeded random channel selection."""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import nn

from ..config import BACKBONES, Settings
from ..errors import ConfigError
from .backbones import build_backbone, cpu_forward


def random_channel_indices(total: int, keep: int, seed: int) -> torch.Tensor:
    """``keep`` distinct channel indices out of ``total``, sorted, drawn from a generator seeded by ``seed``.

    The draw uses its own ``torch.Generator``, so it never touches or depends on global RNG state.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:keep].sort().values


def channel_selection(settings: Settings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(indices, projection)``: the backbone channels kept (:func:`random_channel_indices`) and, for
    ``channel_reduction: semi_orthogonal``, all of them with a ``(total, kept_channels)`` projection
    with orthonormal columns (else None), seeded (Kim et al., 2021, arXiv:2105.14737).

    The projection is the Q factor of a seeded Gaussian matrix (signs fixed by R's diagonal, so the
    result is unique). Projecting the channels on it keeps a mix of all of them, where the random
    selection keeps ``kept_channels`` channels and drops the rest.
    """
    total, kept = settings.total_channels, settings.kept_channels
    if settings.channel_reduction != "semi_orthogonal":
        return random_channel_indices(total, kept, settings.seed), None
    gaussian = torch.randn(total, kept, generator=torch.Generator().manual_seed(settings.seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return torch.arange(total), (q * torch.sign(torch.diagonal(r))).float()


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device` is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 convolutions and matrix products in full float32 (no TF32) inside the block.

    cuDNN convolves float32 in TF32 (10-bit mantissa) by default on Ampere and later GPUs:
    measured on an H200, that moved PaDiM distances by 1.5 % (efficientnet_lite0) from the CPU's,
    and the fitted covariances' inverses by 8 %; without TF32 the difference was 4e-6 (bench/results-cuda.json).
    The user's global flags are restored on exit.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class PatchEmbedder(nn.Module):
    """Images ``(N, 3, S, S)`` -> patch embeddings ``(N, d, S/4, S/4)``.

    The maps of the requested stages are reduced to the selected channels first, then the deeper
    ones are upsampled (nearest, as in the PaDiM paper's embedding concatenation) to the stride-4
    grid and concatenated in stage order; with ``projection`` ``(selected, k)`` the result is
    projected on it. Selecting before upsampling saves work and memory.

    The backbone, weights, layers and seed, and the channels (:func:`channel_selection`) come from
    the settings. On the CPU the network runs over micro-batches of ``cpu_micro_batch`` images in
    the memory format of ``cpu_channels_last`` (None: the sweep's choice, :func:`cpu_forward`); on
    CUDA over the whole batch in the contiguous format. The embeddings of an image do not depend on either.
    """

    def __init__(self, settings: Settings):
        super().__init__()
        channel_indices, projection = channel_selection(settings)
        # Random weights must be reproducible: initialise under a fixed, local RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.extractor = build_backbone(settings.backbone, settings.weights, settings.layers)
        stage_channels = BACKBONES[settings.backbone].stage_channels
        offsets = list(itertools.accumulate((stage_channels[layer - 1] for layer in settings.layers), initial=0))
        for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
            selected = channel_indices[(channel_indices >= lo) & (channel_indices < hi)] - lo
            self.register_buffer(f"select{i}", selected, persistent=False)
        self.register_buffer("projection", projection, persistent=False)
        self.cpu_plan = cpu_forward(settings.cpu_micro_batch, settings.cpu_channels_last)
        self._weights_format = torch.contiguous_format
        self.dim = settings.kept_channels

    def chunks(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """``images`` as the network sees them: on the CPU micro-batches in the chosen memory format
        (the network's weights are moved to that format too), elsewhere the whole batch, contiguous."""
        size, memory_format = max(1, len(images)), torch.contiguous_format
        if images.device.type == "cpu":
            size = self.cpu_plan.micro_batch(images.shape[-2:])
            memory_format = torch.channels_last if self.cpu_plan.channels_last else torch.contiguous_format
        if memory_format != self._weights_format:  # Module.to() walks every parameter: ~7 ms a call on lite0
            self.extractor.to(memory_format=memory_format)
            self._weights_format = memory_format
        for chunk in images.split(size):
            yield chunk.contiguous(memory_format=memory_format)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, d, S/4, S/4)`` embeddings, channels-last in memory: each position's
        ``d`` values are contiguous, the rows the statistics and the distances read (transposing an
        NCHW batch into them took 40 % of the PaDiM part of a lite0 fit). Each micro-batch writes its
        rows in place (a concatenation of the micro-batches copied 72 MB per batch at d = 550)."""
        n, _, height, width = images.shape
        rows = torch.empty(n, height // 4, width // 4, self.dim, device=images.device)  # (N, H, W, d)
        start = 0
        with exact_float32(images.device):
            for chunk in self.chunks(images):
                self._embed(chunk, rows[start : start + len(chunk)])
                start += len(chunk)
        return rows.permute(0, 3, 1, 2)

    def _embed(self, images: torch.Tensor, out: torch.Tensor) -> None:
        """The embeddings of ``images`` into ``out`` ``(n, H, W, d)``."""
        maps = self.extractor(images)
        height, width = out.shape[1:3]
        parts = []
        for i, feature_map in enumerate(maps):
            part = feature_map.permute(0, 2, 3, 1).index_select(-1, getattr(self, f"select{i}"))  # (n, h, w, c)
            n, h, w, c = part.shape
            if c:
                # Nearest upsampling by the integer factor between the grids (1, 2 or 4), as a broadcast: the
                # values of F.interpolate(mode="nearest"), which took 10x as long on CPU (d = 550).
                grown = part[:, :, None, :, None].expand(n, h, height // h, w, width // w, c)
                parts.append(grown.reshape(n, height, width, c))
        if self.projection is None:
            torch.cat(parts, dim=-1, out=out)
        else:
            torch.matmul(torch.cat(parts, dim=-1), self.projection.to(out.dtype), out=out)
