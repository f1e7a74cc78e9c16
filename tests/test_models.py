"""Representation networks: feature sizes, parameter counts, and gradients reaching every layer."""

import pytest
import torch

from bilevel.app import models


def count(module):
    return sum(p.numel() for p in module.parameters())


def conv_bn(inputs, outputs, kernel=3, bias=True):
    return inputs * outputs * kernel * kernel + (outputs if bias else 0) + 2 * outputs


@pytest.mark.parametrize(
    "name,channels,side,features",
    [
        ("omniglot-conv", 1, 28, 256),
        ("miniimagenet-conv", 3, 84, 800),
        ("resnet-paper", 3, 84, 512),
        ("resnet12", 3, 84, 640),
    ],
)
def test_published_feature_sizes(name, channels, side, features):
    assert models.build(name, channels, side).out_features == features


def test_parameter_counts_match_the_architectures():
    omniglot = conv_bn(1, 64) + 3 * conv_bn(64, 64)  # 4 x [conv 3x3 64, BN]
    assert count(models.build("omniglot-conv", 1, 28)) == omniglot == 111_936
    assert count(models.build("miniimagenet-conv", 3, 84)) == conv_bn(3, 32) + 3 * conv_bn(32, 32)
    # ResNet-12 is known as a 12.4M-parameter network (MetaOptNet, TADAM)
    assert 12.4e6 < count(models.build("resnet12", 3, 84)) < 12.5e6
    paper = models.build("resnet-paper", 3, 84)
    head = conv_bn(256, 2048, 1, bias=False) + 2048 * 512 + 512
    assert count(paper.body[4:]) == head  # the 1x1 head after the four blocks


@pytest.mark.parametrize("name", models.MODELS)
def test_forward_and_backward_reach_every_parameter(name):
    torch.manual_seed(0)
    channels, side = (1, 28) if name == "omniglot-conv" else (3, 84)
    net = models.build(name, channels, side, width=0.125)
    features = net(torch.randn(3, channels, side, side))
    assert features.shape == (3, net.out_features)
    (features**2).mean().backward()
    for key, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), key
        assert parameter.grad.abs().sum() > 0, key


def test_width_scales_filters_and_bad_inputs_are_named():
    assert models.build("omniglot-conv", 1, 28, width=0.5).out_features == 32 * 2 * 2
    with pytest.raises(ValueError, match="model must be one of"):
        models.build("vgg", 3, 84)
    with pytest.raises(ValueError, match="too small"):
        models.build("miniimagenet-conv", 3, 8)
