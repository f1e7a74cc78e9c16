"""Four-block convolutional representations of the few-shot literature (the "C4" nets)."""

from __future__ import annotations

from torch import Tensor, nn


def _block(inputs: int, filters: int, stride: int, pool: bool) -> nn.Sequential:
    layers = [
        nn.Conv2d(inputs, filters, 3, stride=stride, padding=1),
        nn.BatchNorm2d(filters),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """4 x [conv 3x3 (padding 1), batch norm, ReLU], then either a stride of 2 in each conv
    (``pool=False``, the Omniglot net) or a 2x2 max-pool after each block (the mini-ImageNet
    net); the output is flattened. ``out_features`` is the feature size for ``image_size``."""

    def __init__(
        self, channels: int, filters: int, image_size: int, pool: bool, blocks: int = 4
    ) -> None:
        super().__init__()
        stride = 1 if pool else 2
        widths = [channels] + [filters] * blocks
        self.body = nn.Sequential(
            *(_block(a, b, stride, pool) for a, b in zip(widths, widths[1:])),
            nn.Flatten(),
        )
        side = image_size
        for _ in range(blocks):  # padding 1: stride 2 gives ceil(s/2); max-pool floors
            side = side // 2 if pool else (side + 1) // 2
        if side < 1:
            raise ValueError(f"{image_size}x{image_size} images are too small for {blocks} blocks")
        self.out_features = filters * side * side

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def omniglot_convnet(width: float = 1.0, channels: int = 1, image_size: int = 28) -> ConvNet:
    """Franceschi et al. (2018) on Omniglot: 64 filters, stride 2; 28x28 -> 256 features."""
    return ConvNet(channels, _scaled(64, width), image_size, pool=False)


def miniimagenet_convnet(width: float = 1.0, channels: int = 3, image_size: int = 84) -> ConvNet:
    """The mini-ImageNet C4 net (as in MAML): 32 filters, max-pool; 84x84 -> 800 features."""
    return ConvNet(channels, _scaled(32, width), image_size, pool=True)


def _scaled(filters: int, width: float) -> int:
    return max(1, round(filters * width))
