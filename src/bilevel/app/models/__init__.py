"""Representation networks for few-shot learning: images [n, C, H, W] -> features [n, d].

Every model has ``out_features`` (d). ``build(name, ...)`` makes one by name; ``width``
scales every layer's filter count (1.0 is the published net; small values for tests).
"""

from __future__ import annotations

from torch import nn

from .convnet import ConvNet, miniimagenet_convnet, omniglot_convnet
from .resnet import ResidualBlock, ResidualNet, paper_resnet, resnet12

MODELS = ("omniglot-conv", "miniimagenet-conv", "resnet-paper", "resnet12")

__all__ = [
    "MODELS",
    "ConvNet",
    "ResidualBlock",
    "ResidualNet",
    "build",
    "miniimagenet_convnet",
    "omniglot_convnet",
    "paper_resnet",
    "resnet12",
]


def build(name: str, channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """The model ``name`` (one of MODELS) for square images of ``channels`` x ``image_size``."""
    if name == "omniglot-conv":
        return omniglot_convnet(width, channels, image_size)
    if name == "miniimagenet-conv":
        return miniimagenet_convnet(width, channels, image_size)
    if name == "resnet-paper":
        return paper_resnet(width, channels)
    if name == "resnet12":
        return resnet12(width, channels)
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
