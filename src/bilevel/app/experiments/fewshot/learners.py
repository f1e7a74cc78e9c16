"""What is trained: a representation network, and how one training step updates it.

Bilevel (the paper's hyper-representation): a meta-batch of B episodes is one batched inner
problem. The network embeds all support and query images once; per-episode linear heads
W [B, d, N], b [B, N] start at zero and take T gradient steps on the sum over episodes of each
episode's mean support cross-entropy (so each head sees only its own episode's gradient);
``bilevel.solve`` returns the heads w_T, and the mean query cross-entropy at w_T is
back-propagated through the T steps into the network. Classical (E3): the same network with
one linear layer over all meta-training classes, trained by ordinary minibatch cross-entropy.

Batch norm: in meta-training the network is in training mode and, by default
(``train_batch_norm="episode"``), each episode's support and query images are normalised by
their own statistics, in one forward pass of the meta-batch (:class:`EpisodeBatchNorm2d`); the
running statistics take one update per iteration, by the mean of the episodes' statistics.
No episode's features depend on another's, so a meta-batch split over processes gives the
numbers of one process (bilevel.app.distributed). ``"meta-batch"`` normalises the whole meta-batch
as one batch-norm batch (one process only). At meta-validation (``val_batch_norm``) and
meta-test (``test_batch_norm``) the network is run in one of three ways (``_episode_features``):

- "transductive" (the default, as training normalises): an episode's support and query images
  form one batch-norm batch; every feature depends on every image of its episode.
- "separate": the support images form one batch-norm batch and the query images another, as
  the paper's code (FAR-HO, where support and query are fed to the network apart) and MAML's
  do, in training and at test; a support feature depends on the support images only, a query
  feature on the query images only (on the other queries too: still transductive over them).
- "running": the running statistics of meta-training, in eval mode; every image's features
  depend on that image alone (inductive).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import bilevel

from ... import models
from ...data import Episodes
from .config import BATCH_NORM_MODES, IMAGES, FewshotConfig


class EpisodeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training with ``episodes`` > 1, normalises each of ``episodes``
    equal consecutive groups of the batch by the group's own statistics, and updates the
    running statistics once, by the mean over the groups of their batch statistics. With
    ``episodes == 1`` (and in eval mode) it is ``nn.BatchNorm2d``; the state dict is the same."""

    episodes = 1

    def forward(self, x: Tensor) -> Tensor:
        groups = self.episodes
        if groups == 1 or not self.training:
            return super().forward(x)
        channels = x.shape[1]
        grouped = x.view(groups, x.shape[0] // groups, *x.shape[1:])
        dims = (1, *range(3, grouped.dim()))  # all but the group and the channel
        mean = grouped.mean(dims, keepdim=True)
        var = grouped.var(dims, unbiased=False, keepdim=True)
        y = (grouped - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = (channels,) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum
                if factor is None:  # cumulative moving average, as nn.BatchNorm2d
                    factor = 1.0 / float(self.num_batches_tracked)
                count = grouped[0].numel() // channels
                unbiased = var * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean.mean(0).flatten(), factor)
                self.running_var.lerp_(unbiased.mean(0).flatten(), factor)
        return y.view_as(x)


def per_episode_norm(net: nn.Module) -> nn.Module:
    """Make the BatchNorm2d layers of ``net`` EpisodeBatchNorm2d (in place; same state)."""
    for module in net.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = EpisodeBatchNorm2d
    return net


@contextmanager
def episode_groups(net: nn.Module, episodes: int) -> Iterator[None]:
    """Within the block, ``net``'s batch norm normalises ``episodes`` groups separately."""
    layers = [m for m in net.modules() if isinstance(m, EpisodeBatchNorm2d)]
    for layer in layers:
        layer.episodes = episodes
    try:
        yield
    finally:
        for layer in layers:
            layer.episodes = 1


def norm_statistics(net: nn.Module) -> list[Tensor]:
    """The running batch-norm statistics of ``net`` (float buffers)."""
    return [
        b
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var)
        if b is not None
    ]


class FixedNorm:
    """Forward hook: the output rows scaled to norm ``radius`` (with a fixed inner lr this holds
    the heads' effective step lr * |features|^2 fixed; in classical training it normalises the
    classifier's input the same way)."""

    def __init__(self, radius: float) -> None:
        self.radius = radius

    def __call__(self, module: nn.Module, inputs, out: Tensor) -> Tensor:
        return self.radius * F.normalize(out, dim=-1)

    def __repr__(self) -> str:
        return f"FixedNorm(radius={self.radius})"


class Learner(nn.Module):
    """The network, the learned log inner learning rate (if any) and, for classical training,
    a linear classifier over ``classes`` meta-training classes."""

    def __init__(self, config: FewshotConfig, classes: int | None = None) -> None:
        super().__init__()
        channels, side = IMAGES[config.dataset]
        self.net = per_episode_norm(models.build(config.model, channels, side, config.width))
        self.fixed_lr = config.inner_lr
        self.log_lr = (
            nn.Parameter(torch.tensor(math.log(config.inner_lr))) if config.learn_inner_lr else None
        )
        if config.feature_norm is not None:
            # A hook rather than a wrapping module: the state dict stays the paper network's,
            # so init_from and checkpoints load with or without it.
            self.net.register_forward_hook(FixedNorm(config.feature_norm))
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

    One forward pass embeds support and query together; batch norm normalises each episode's
    images, or the whole meta-batch, as ``config.train_batch_norm`` says.
    """
    b, n_support = batch.support_y.shape
    images = torch.cat([batch.support_x, batch.query_x], 1)  # [B, n_s + n_q, C, H, W]
    groups = b if config.train_batch_norm == "episode" else 1
    with episode_groups(learner.net, groups):
        features = learner.net(images.flatten(0, 1)).view(b, images.shape[1], -1)
    support, query = features[:, :n_support], features[:, n_support:]
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
    learner: Learner,
    sampler,
    episodes: int,
    steps: list[int],
    batch_norm: str,
    share: tuple[int, int] = (0, 1),
) -> dict[int, np.ndarray]:
    """Query accuracy of each of ``episodes`` episodes after T steps, for every T in ``steps``.

    Heads are trained from zero under no_grad (solve stores nothing). T is increased in
    order, continuing from the previous w_T: plain gradient descent has no other state.
    ``share=(rank, processes)``: every process draws every batch (the sampler's stream stays
    the same) and evaluates batches rank, rank + processes, ...; the others' entries are NaN,
    to be filled in by the other processes (:func:`bilevel.app.distributed.Group.fill`).
    """
    rank, processes = share
    results: dict[int, list[np.ndarray]] = {t: [] for t in steps}
    device, done, draw = next(learner.parameters()).device, 0, 0
    while done < episodes:
        batch = sampler.sample()
        keep = min(batch.support_y.shape[0], episodes - done)
        if draw % processes == rank:
            accuracy = _batch_accuracy(learner, batch.to(device), sorted(steps), batch_norm)
        else:
            accuracy = {t: np.full(keep, np.nan, dtype=np.float32) for t in steps}
        for t, correct in accuracy.items():
            results[t].append(correct[:keep])
        done, draw = done + keep, draw + 1
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
    """Support and query features [B, n, d] of each episode, batch norm as ``batch_norm`` says
    (the module docstring): "transductive" (support+query one batch-norm batch per episode),
    "separate" (support one batch, query another) or "running" (running statistics). The
    running statistics are left untouched."""
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(
            f"batch_norm={batch_norm!r}: expected one of {', '.join(BATCH_NORM_MODES)}"
        )
    b, n_support = batch.support_y.shape
    images = torch.cat([batch.support_x, batch.query_x], 1)  # [B, n_s + n_q, C, H, W]
    was_training = net.training
    if batch_norm == "running":
        net.eval()
        features = net(images.flatten(0, 1)).view(b, images.shape[1], -1)
    else:
        net.train()  # batch statistics, but the running ones are left untouched
        params, apply = bilevel.functional(net)
        if batch_norm == "transductive":
            features = torch.stack([apply(params, episode) for episode in images])
        else:
            support = torch.stack([apply(params, episode) for episode in batch.support_x])
            query = torch.stack([apply(params, episode) for episode in batch.query_x])
            features = torch.cat([support, query], 1)
    net.train(was_training)
    return features[:, :n_support], features[:, n_support:]


def confidence(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and the half-width of its 95% confidence interval, in percent."""
    n = len(accuracies)
    half = 1.96 * accuracies.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return 100 * float(accuracies.mean()), 100 * float(half)
