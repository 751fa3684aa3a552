"""Patch embeddings: backbone stage maps on the stride-4 grid, with seeded random channel selection."""

from __future__ import annotations

from typing import Sequence

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


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("`device` is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


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
    ):
        super().__init__()
        # Random weights must be reproducible: initialise under a fixed, local RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.extractor = build_backbone(backbone, weights, layers)
        offsets = [0]
        for layer in layers:
            offsets.append(offsets[-1] + stage_channels[layer - 1])
        self.per_stage = [
            (channel_indices[(channel_indices >= lo) & (channel_indices < hi)] - lo) for lo, hi in zip(offsets, offsets[1:])
        ]
        for i, indices in enumerate(self.per_stage):
            self.register_buffer(f"_select{i}", indices, persistent=False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.extractor(images)
        grid = maps[0].shape[-2:] if self.extractor.layers[0] == 1 else (images.shape[-2] // 4, images.shape[-1] // 4)
        parts = []
        for i, feature_map in enumerate(maps):
            selected = feature_map.index_select(1, getattr(self, f"_select{i}"))
            if selected.shape[1] == 0:
                continue
            if selected.shape[-2:] != grid:
                selected = F.interpolate(selected, size=grid, mode="nearest")
            parts.append(selected)
        return torch.cat(parts, dim=1)
