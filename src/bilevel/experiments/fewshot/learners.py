"""What is trained: a representation network, and how one training step updates it.

Bilevel (the paper's hyper-representation): a meta-batch of B episodes is one batched inner
problem. The network embeds all support and query images once; per-episode linear heads
W [B, d, N], b [B, N] start at zero and take T gradient steps on the sum over episodes of each
episode's mean support cross-entropy (so each head sees only its own episode's gradient);
``bilevel.solve`` returns the heads w_T, and the mean query cross-entropy at w_T is
back-propagated through the T steps into the network. Classical (E3): the same network with
one linear layer over all meta-training classes, trained by ordinary minibatch cross-entropy.

Batch norm: in meta-training the network is in training mode and one forward pass normalises
the whole meta-batch (support and query of its B episodes) with its own statistics. At
meta-validation and meta-test (``test_batch_norm``) either each episode is normalised with
the statistics of its own support+query images ("transductive", the default: what MAML and
the paper's code did, and closest to training) or with the running statistics accumulated in
training ("running": no episode sees another's or its own query statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import bilevel

from ... import models
from ...data import Episodes
from .config import IMAGES, FewshotConfig


class Learner(nn.Module):
    """The network, the learned log inner learning rate (if any) and, for classical training,
    a linear classifier over ``classes`` meta-training classes."""

    def __init__(self, config: FewshotConfig, classes: int | None = None) -> None:
        super().__init__()
        channels, side = IMAGES[config.dataset]
        self.net = models.build(config.model, channels, side, config.width)
        self.fixed_lr = config.inner_lr
        self.log_lr = (
            nn.Parameter(torch.tensor(math.log(config.inner_lr))) if config.learn_inner_lr else None
        )
        self.classifier = None if classes is None else nn.Linear(self.net.out_features, classes)

    def hparams(self, support: Tensor) -> dict[str, Tensor]:
        """The inner problem's hyperparameters: support features, and log(lr) when learned."""
        if self.log_lr is None:
            return {"support": support}
        return {"support": support, "log_lr": self.log_lr}

    def dynamics(self) -> bilevel.Dynamics:
        if self.log_lr is None:
            return bilevel.sgd(lr=self.fixed_lr)
        return bilevel.sgd(lr=lambda h: h["log_lr"].exp())

    def inner_lr(self) -> float:
        return self.fixed_lr if self.log_lr is None else float(self.log_lr.detach().exp())


def head_logits(heads: dict[str, Tensor], features: Tensor) -> Tensor:
    """Per-episode linear heads: features [B, n, d] -> logits [B, n, N]."""
    return torch.baddbmm(heads["b"].unsqueeze(1), features, heads["W"])


def zero_heads(support: Tensor, ways: int) -> dict[str, Tensor]:
    batch, _, features = support.shape
    zeros = dict(device=support.device, dtype=support.dtype)
    return {
        "W": torch.zeros(batch, features, ways, **zeros),
        "b": torch.zeros(batch, ways, **zeros),
    }


def support_loss(labels: Tensor, ways: int) -> Callable:
    """Sum over episodes of each episode's mean support cross-entropy: the episodes' heads are
    independent, each one's gradient is that of its own episode's mean loss."""
    per_episode = labels.shape[1]

    def inner(heads: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        logits = head_logits(heads, hparams["support"]).reshape(-1, ways)
        return F.cross_entropy(logits, labels.reshape(-1), reduction="sum") / per_episode

    return inner


def train_heads(
    learner: Learner, support: Tensor, labels: Tensor, ways: int, steps: int, memory: str
) -> dict[str, Tensor]:
    """w_T: T steps from zero; differentiable w.r.t. the features unless grad is off."""
    return bilevel.solve(
        support_loss(labels, ways),
        zero_heads(support, ways),
        learner.hparams(support),
        learner.dynamics(),
        steps,
        memory=memory,
    )


def meta_loss(learner: Learner, batch: Episodes, config: FewshotConfig) -> tuple[Tensor, Tensor]:
    """(mean query cross-entropy at w_T, query accuracy) of one meta-batch.

    One forward pass embeds support and query together: one batch-norm batch, as a plain
    supervised step on the same images would be.
    """
    b, n_support = batch.support_y.shape
    images = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    features = learner.net(images)
    support = features[: b * n_support].view(b, n_support, -1)
    query = features[b * n_support :].view(b, -1, features.shape[1])
    heads = train_heads(
        learner, support, batch.support_y, config.ways, config.inner_steps, config.memory
    )
    logits = head_logits(heads, query)
    loss = F.cross_entropy(logits.reshape(-1, config.ways), batch.query_y.reshape(-1))
    accuracy = (logits.argmax(-1) == batch.query_y).float().mean()
    return loss, accuracy


def classical_loss(learner: Learner, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = learner.classifier(learner.net(images))
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


# --- evaluation on episodes -----------------------------------------------------------------


@torch.no_grad()
def evaluate(
    learner: Learner, sampler, episodes: int, steps: list[int], batch_norm: str
) -> dict[int, np.ndarray]:
    """Query accuracy of each of ``episodes`` episodes after T steps, for every T in ``steps``.

    Heads are trained from zero under no_grad (solve stores nothing). T is increased in
    order, continuing from the previous w_T: plain gradient descent has no other state.
    """
    results: dict[int, list[np.ndarray]] = {t: [] for t in steps}
    device, done = next(learner.parameters()).device, 0
    while done < episodes:
        batch = sampler.sample().to(device)
        keep = min(batch.support_y.shape[0], episodes - done)
        for t, correct in _batch_accuracy(learner, batch, sorted(steps), batch_norm).items():
            results[t].append(correct[:keep])
        done += keep
    return {t: np.concatenate(v) for t, v in results.items()}


def _batch_accuracy(
    learner: Learner, batch: Episodes, steps: list[int], batch_norm: str
) -> dict[int, np.ndarray]:
    support, query = _episode_features(learner.net, batch, batch_norm)
    ways = int(batch.support_y.max()) + 1
    inner, dynamics = support_loss(batch.support_y, ways), learner.dynamics()
    hparams = learner.hparams(support)
    heads, done, out = zero_heads(support, ways), 0, {}
    for t in steps:
        heads = bilevel.solve(inner, heads, hparams, dynamics, t - done) if t > done else heads
        done = t
        hits = head_logits(heads, query).argmax(-1) == batch.query_y
        out[t] = hits.float().mean(1).cpu().numpy()
    return out


def _episode_features(net: nn.Module, batch: Episodes, batch_norm: str) -> tuple[Tensor, Tensor]:
    """Support and query features [B, n, d]: each episode in a batch-norm batch of its own
    (transductive), or all at once with the running statistics."""
    b, n_support = batch.support_y.shape
    images = torch.cat([batch.support_x, batch.query_x], 1)  # [B, n_s + n_q, C, H, W]
    was_training = net.training
    if batch_norm == "running":
        net.eval()
        features = net(images.flatten(0, 1)).view(b, images.shape[1], -1)
    else:
        net.train()  # batch statistics, but the running ones are left untouched
        params, apply = bilevel.functional(net)
        features = torch.stack([apply(params, episode) for episode in images])
    net.train(was_training)
    return features[:, :n_support], features[:, n_support:]


def confidence(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and the half-width of its 95% confidence interval, in percent."""
    n = len(accuracies)
    half = 1.96 * accuracies.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return 100 * float(accuracies.mean()), 100 * float(half)
