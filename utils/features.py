"""Patch embeddings: backbone stage maps on the stride-4 grid, with seeded random channel selection."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone


def random_channel_indices(total: int, keep: int, seed: int) -> torch.Tensor:
    """``keep`` distinct channel indices out of ``total``, sorted, drawn from a generator seeded by ``seed``.

    The draw uses its own ``torch.Generator``, so it never touches or depends on global RNG state.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:keep].sort().values


def semi_orthogonal_projection(total: int, keep: int, seed: int) -> torch.Tensor:
    """A ``(total, keep)`` matrix with orthonormal columns, seeded (Kim et al., 2021, arXiv:2105.14737).

    The Q factor of a seeded Gaussian matrix (signs fixed by R's diagonal, so the result is
    unique). Projecting the ``total`` channels on it keeps a mix of all of them, where the random
    selection keeps ``keep`` channels and drops the rest.
    """
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(total, keep, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("`device` is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 convolutions and matrix products in full float32 (no TF32) inside the block.

    cuDNN convolves float32 in TF32 (10-bit mantissa) by default on Ampere and later GPUs:
    measured on an H200, that moved PaDiM distances by 1.5 % (efficientnet_lite0) from the CPU's,
    and the precision matrices by 8 %; without TF32 the difference is 4e-6 (bench/results-cuda.json).
    The user's global flags are restored on exit.
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class PatchEmbedder(nn.Module):
    """Images ``(N, 3, S, S)`` -> patch embeddings ``(N, d, S/4, S/4)``.

    The maps of the requested stages are reduced to the selected channels first, then the deeper
    ones are upsampled (nearest, as in the PaDiM paper's embedding concatenation) to the stride-4
    grid and concatenated in stage order. Selecting before upsampling saves work and memory.
    """

    def __init__(
        self,
        backbone: str,
        weights: str,
        layers: Sequence[int],
        channel_indices: torch.Tensor,
        stage_channels: Sequence[int],
        seed: int = 0,
        projection: torch.Tensor | None = None,
    ):
        super().__init__()
        # Random weights must be reproducible: initialise under a fixed, local RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.extractor = build_backbone(backbone, weights, layers)
        # Channels-last (NHWC) convolutions are 15-25 % faster on CPU (oneDNN) and give maps
        # whose channels are contiguous, so selecting channels and storing the embeddings
        # position-major below are cheap row copies instead of large transposes.
        self.extractor.to(memory_format=torch.channels_last)
        offsets = [0]
        for layer in layers:
            offsets.append(offsets[-1] + stage_channels[layer - 1])
        self.per_stage = [
            (channel_indices[(channel_indices >= lo) & (channel_indices < hi)] - lo) for lo, hi in zip(offsets, offsets[1:])
        ]
        for i, indices in enumerate(self.per_stage):
            self.register_buffer(f"_select{i}", indices, persistent=False)
        #: Optional ``(selected channels, k)`` projection applied after the selection.
        self.register_buffer("projection", projection, persistent=False)
        #: On CUDA, smaller batches are padded with zero images to this many (``Padim`` sets its
        #: batch size): cuDNN then sees one input shape per process instead of one per batch size.
        self.cuda_batch: int | None = None

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(N, d, H, W)`` of ``images`` over position-major memory (see :meth:`selected`),
        projected on ``projection`` when there is one."""
        selected = self.selected(images)  # (N, D, H, W) over (H, W, N, D) memory
        if self.projection is None:
            return selected
        projected = torch.matmul(selected.permute(2, 3, 0, 1), self.projection.to(selected.dtype))  # (H, W, N, k)
        return projected.permute(2, 3, 0, 1)

    @torch.inference_mode()
    def selected(self, images: torch.Tensor) -> torch.Tensor:
        """Selected-channel embeddings ``(N, d, H, W)`` of ``images``.

        The result is stored position-major, as ``(H, W, N, d)`` in memory, and returned as a
        permuted ``(N, d, H, W)`` view: values are the same as a contiguous tensor's, but the
        per-position matrices ``(N, d)`` that the statistics and the Mahalanobis distance multiply
        are contiguous, so neither has to transpose ~70 MB per batch (wide_resnet50_2, d = 550).
        Selection, nearest upsampling, concatenation and this transposition happen in one copy per
        stage.
        """
        n = images.shape[0]
        if images.is_cuda and self.cuda_batch is not None and n < self.cuda_batch:
            images = torch.cat([images, images.new_zeros((self.cuda_batch - n, *images.shape[1:]))])
        with exact_float32(images.device):
            maps = self.extractor(images.contiguous(memory_format=torch.channels_last))
        maps = [feature_map[:n] for feature_map in maps]
        gh, gw = maps[0].shape[-2:] if self.extractor.layers[0] == 1 else (images.shape[-2] // 4, images.shape[-1] // 4)
        dim = sum(int(indices.numel()) for indices in self.per_stage)
        out = torch.empty(gh, gw, n, dim, dtype=maps[0].dtype, device=maps[0].device).permute(2, 3, 0, 1)
        offset = 0
        for i, feature_map in enumerate(maps):
            indices = getattr(self, f"_select{i}")
            k = int(indices.numel())
            if k == 0:
                continue
            # Channels last: (N, h, w, C) is contiguous, the selection gathers within rows.
            selected = feature_map.permute(0, 2, 3, 1).index_select(3, indices)  # (N, h, w, k)
            target = out[:, offset : offset + k].permute(0, 2, 3, 1)  # (N, H, W, k)
            h, w = selected.shape[1:3]
            if (h, w) == (gh, gw):
                target.copy_(selected)
            elif gh % h == 0 and gw % w == 0:
                # Nearest upsampling by an integer factor repeats every pixel fy x fx times
                # (exactly what F.interpolate(mode="nearest") does): a broadcasting copy.
                fy, fx = gh // h, gw // w
                target.unflatten(2, (w, fx)).unflatten(1, (h, fy)).copy_(selected[:, :, None, :, None, :])
            else:
                upsampled = F.interpolate(selected.permute(0, 3, 1, 2), size=(gh, gw), mode="nearest")
                target.copy_(upsampled.permute(0, 2, 3, 1))
            offset += k
        return out
