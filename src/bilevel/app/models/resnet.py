"""Residual representations: the paper's residual net and ResNet-12.

Both stack four residual blocks; each block is 3 x [conv 3x3, batch norm, leaky ReLU 0.1] on
the main path and [conv 1x1, batch norm] on the skip, summed before the last activation (as in
TADAM and MetaOptNet), then a 2x2 max-pool. The paper's net (filters 64, 96, 128, 256) ends
with conv 1x1 to 2048, global average pool and conv 1x1 to 512 (512 features); ResNet-12
(filters 64, 160, 320, 640) ends with global average pooling (640 features).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

SLOPE = 0.1


def _conv_bn(inputs: int, outputs: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(outputs),
    ]


class ResidualBlock(nn.Module):
    def __init__(self, inputs: int, filters: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            *_conv_bn(inputs, filters, 3),
            nn.LeakyReLU(SLOPE),
            *_conv_bn(filters, filters, 3),
            nn.LeakyReLU(SLOPE),
            *_conv_bn(filters, filters, 3),
        )
        self.skip = nn.Sequential(*_conv_bn(inputs, filters, 1))
        self.out = nn.Sequential(nn.LeakyReLU(SLOPE), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.main(x) + self.skip(x))


class ResidualNet(nn.Module):
    """Four residual blocks of ``filters``, then an optional 1x1 head ``(wide, out)``:
    conv 1x1 to ``wide`` (BN, leaky ReLU), global average pool, conv 1x1 to ``out``."""

    def __init__(
        self, channels: int, filters: Sequence[int], head: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        widths = [channels, *filters]
        layers: list[nn.Module] = [ResidualBlock(a, b) for a, b in zip(widths, widths[1:])]
        if head is None:
            layers += [nn.AdaptiveAvgPool2d(1)]
            self.out_features = widths[-1]
        else:
            wide, out = head
            layers += [
                *_conv_bn(widths[-1], wide, 1),
                nn.LeakyReLU(SLOPE),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(wide, out, 1),
            ]
            self.out_features = out
        self.body = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def paper_resnet(width: float = 1.0, channels: int = 3) -> ResidualNet:
    """Franceschi et al. (2018) residual net for mini-ImageNet: 512 features."""
    return ResidualNet(channels, _scaled((64, 96, 128, 256), width), _scaled((2048, 512), width))


def resnet12(width: float = 1.0, channels: int = 3) -> ResidualNet:
    """ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019, without DropBlock): 640 features."""
    return ResidualNet(channels, _scaled((64, 160, 320, 640), width))


def _scaled(filters: Sequence[int], width: float) -> tuple[int, ...]:
    return tuple(max(1, round(f * width)) for f in filters)
