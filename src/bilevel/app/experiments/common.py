"""Pieces several experiments share: seeding, devices, linear softmax models, metrics."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

import bilevel


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator for data sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def linear_logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
    return F.linear(x, params["W"], params["b"])


def zero_linear(features: int, classes: int, device, dtype=torch.float32) -> dict[str, Tensor]:
    # nn.Linear's [classes, features] layout: on CPU (MKL) its products are ~2.5x faster here
    # than those of the transposed [features, classes] one
    return {
        "W": torch.zeros(classes, features, device=device, dtype=dtype),
        "b": torch.zeros(classes, device=device, dtype=dtype),
    }


def accuracy(params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((linear_logits(params, x).argmax(1) == y).float().mean())


def train_linear(
    x: Tensor, y: Tensor, classes: int, lr: float, steps: int, weight_decay: float = 0.0
) -> dict[str, Tensor]:
    """Full-batch gradient descent on the mean cross-entropy, from zero (the inner dynamics
    without any hyperparameter): the retraining of baselines."""

    def loss(params, hparams):
        return F.cross_entropy(linear_logits(params, x), y)

    start = zero_linear(x.shape[1], classes, x.device, x.dtype)
    return bilevel.solve(loss, start, {}, bilevel.sgd(lr=lr, weight_decay=weight_decay), steps)


def f1_score(flagged: Tensor, truth: Tensor) -> dict[str, float]:
    true_positive = float((flagged & truth).sum())
    precision = true_positive / max(float(flagged.sum()), 1.0)
    recall = true_positive / max(float(truth.sum()), 1.0)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1}
