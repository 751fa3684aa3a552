"""The decision threshold and the colour scale, from maps of normal validation images only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from ..config import Settings
from ..data import Loader
from ..padim import Padim
from .metrics import normal_threshold
from .protocol import healthy_threshold

#: Percentile of normal validation pixels (inside the head) used as the decision threshold.
VAL_PERCENTILE = 99.0


@dataclass
class NormalReference:
    """Statistics of normal validation maps: the decision threshold and the heat-map colour scale.

    ``threshold``: ``percentile`` of the pixels inside the head. ``vmin``: their 1st percentile;
    ``vmax``: the threshold, so every pixel above the threshold saturates the colour scale (the
    same pixels the thresholded panel shows). ``field_threshold``: the field's operating point, the
    smallest value leaving at most 5 % of the pixels above it (inside the head;
    :func:`utils.evaluation.protocol.healthy_threshold`).
    """

    source: str
    #: Where the heads of the reference images came from: given masks, estimated, whole image.
    region_kind: str
    percentile: float
    threshold: float
    vmin: float
    vmax: float
    field_threshold: float


def reference_maps(model: Padim, dataset: Dataset, settings: Settings, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``(n, S, S)`` of the normal validation ``dataset`` (images or volume slices) and each
    item's ``head`` ``(n, S, S)`` (given masks, the data path's estimate, or the whole image:
    :attr:`utils.data.ImageSet.head_kinds`): the pixels the threshold is taken from."""
    maps, regions = [], []
    for batch in Loader(dataset, settings):
        maps.append(model.score([batch], progress=False).maps)
        regions.append(batch["head"].numpy())
        if bar is not None:
            bar.update(len(batch["image"]))
    return np.concatenate(maps), np.concatenate(regions)


def normal_reference(model: Padim, dataset: Dataset, source: str, settings: Settings, bar=None) -> NormalReference:
    """:class:`NormalReference` of the normal validation ``dataset``, from its float32 maps and their
    bool head regions (:func:`reference_maps`)."""
    maps, regions = reference_maps(model, dataset, settings, bar)
    values = maps[regions]
    threshold = normal_threshold(values, None, VAL_PERCENTILE)
    low = float(np.percentile(values, 1.0))
    return NormalReference(source, "+".join(sorted(dataset.head_kinds)), VAL_PERCENTILE, threshold, low,
                           max(threshold, low + 1e-6), healthy_threshold(maps, regions))
