"""W2, hyper-representation meta-iteration: the paper's Omniglot network (4 x [conv 3x3, 64
filters, stride 2, batch norm, ReLU] on 28x28 -> 256 features), 5-way 1-shot episodes with 15
queries per class, a meta-batch of 16, T = 5 gradient steps (lr 0.1) on zero-initialised linear
heads, and Adam on the representation. Images are synthetic (the cost does not depend on them).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel

from .common import LOWER_BOUND, Impl, flat

WAYS, SHOTS, QUERIES, EPISODES, STEPS, LR = 5, 1, 15, 16, 5, 0.1
SUPPORT, QUERY, FEATURES = WAYS * SHOTS, WAYS * QUERIES, 256
POLICIES = ("graph", "trajectory", "checkpoint")


def sizes(mode: str) -> list[dict]:
    return [{"B": EPISODES, "T": STEPS}]


def repetitions(mode: str, size: dict) -> tuple[int, int]:
    return (2, 5) if mode == "quick" else (3, 15)


def warmup_size(size: dict) -> dict:
    return size


def implementations(size: dict) -> list[Impl]:
    return [
        Impl(LOWER_BOUND, note="one supervised step (forward, backward, Adam), 1280 images"),
        *(Impl(f"bilevel:reverse-{p}", note="bilevel.solve, batched heads") for p in POLICIES),
        Impl("torch:unroll-batched", note="hand-written, batched heads"),
        Impl("torch:unroll-loop", note="hand-written, loop over episodes"),
        Impl("higher", "higher", note="loop over episodes"),
        Impl("torchopt", "torchopt", note="MetaSGD, loop over episodes"),
    ]


def network() -> nn.Sequential:
    torch.manual_seed(0)
    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
        channels = 64
    return nn.Sequential(*layers, nn.Flatten())


@dataclass(frozen=True)
class Episodes:
    images: Tensor  # [B * SUPPORT + B * QUERY, 1, 28, 28]: every support image, then queries
    y_support: Tensor  # [B, SUPPORT]
    y_query: Tensor  # [B, QUERY]


@functools.cache
def episodes(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Episodes:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(EPISODES * (SUPPORT + QUERY), 1, 28, 28, generator=g)
    y_support = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(EPISODES, 1)
    y_query = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(EPISODES, 1)
    return Episodes(images.to(device, dtype), y_support.to(device), y_query.to(device))


def split(features: Tensor) -> tuple[Tensor, Tensor]:
    n = EPISODES * SUPPORT
    support = features[:n].view(EPISODES, SUPPORT, FEATURES)
    return support, features[n:].view(EPISODES, QUERY, FEATURES)


# -- the heads' objectives, batched over episodes ([B, F, WAYS] weights, [B, WAYS] biases) ------
def logits(W: Tensor, b: Tensor, features: Tensor) -> Tensor:
    return torch.baddbmm(b.unsqueeze(1), features, W)


def inner_loss(W, b, support, y_support) -> Tensor:
    """Sum over episodes of each episode's mean support cross-entropy (independent heads)."""
    ce = F.cross_entropy(logits(W, b, support).flatten(0, 1), y_support.flatten(), reduction="sum")
    return ce / y_support.shape[1]


def outer_loss(W, b, query, y_query) -> Tensor:
    """Mean query cross-entropy over the meta-batch."""
    return F.cross_entropy(logits(W, b, query).flatten(0, 1), y_query.flatten())


def head_zeros(like: Tensor, requires_grad: bool = False) -> tuple[Tensor, Tensor]:
    W = like.new_zeros(EPISODES, FEATURES, WAYS, requires_grad=requires_grad)
    return W, like.new_zeros(EPISODES, WAYS, requires_grad=requires_grad)


# -- the inner problems + outer loss, one function per implementation -------------------------
def bilevel_heads(policy: str, e: Episodes, support: Tensor, query: Tensor) -> Tensor:
    def inner(p, h):
        return inner_loss(p["W"], p["b"], h["support"], e.y_support)

    W, b = head_zeros(support)
    w_T = bilevel.solve(
        inner, {"W": W, "b": b}, {"support": support}, bilevel.sgd(lr=LR), STEPS,
        method="reverse", memory=policy,
    )  # fmt: skip
    return outer_loss(w_T["W"], w_T["b"], query, e.y_query)


def batched_heads(e: Episodes, support: Tensor, query: Tensor) -> Tensor:
    W, b = head_zeros(support, requires_grad=True)
    for _ in range(STEPS):
        gW, gb = torch.autograd.grad(
            inner_loss(W, b, support, e.y_support), (W, b), create_graph=True
        )
        W, b = W - LR * gW, b - LR * gb
    return outer_loss(W, b, query, e.y_query)


def looped_heads(e: Episodes, support: Tensor, query: Tensor) -> Tensor:
    total = 0
    for j in range(EPISODES):
        W = support.new_zeros(FEATURES, WAYS, requires_grad=True)
        b = support.new_zeros(WAYS, requires_grad=True)
        for _ in range(STEPS):
            loss = F.cross_entropy(support[j] @ W + b, e.y_support[j])
            gW, gb = torch.autograd.grad(loss, (W, b), create_graph=True)
            W, b = W - LR * gW, b - LR * gb
        total = total + F.cross_entropy(query[j] @ W + b, e.y_query[j])
    return total / EPISODES


def zero_head(like: Tensor) -> nn.Linear:
    head = nn.Linear(FEATURES, WAYS).to(like)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def higher_heads(e: Episodes, support: Tensor, query: Tensor) -> Tensor:
    import higher

    total = 0
    for j in range(EPISODES):
        head = zero_head(support)
        optimizer = torch.optim.SGD(head.parameters(), lr=LR)
        with higher.innerloop_ctx(head, optimizer, copy_initial_weights=True) as (fhead, diffopt):
            for _ in range(STEPS):
                diffopt.step(F.cross_entropy(fhead(support[j]), e.y_support[j]))
            total = total + F.cross_entropy(fhead(query[j]), e.y_query[j])
    return total / EPISODES


def torchopt_heads(e: Episodes, support: Tensor, query: Tensor) -> Tensor:
    import torchopt

    total = 0
    for j in range(EPISODES):
        head = zero_head(support)
        optimizer = torchopt.MetaSGD(head, lr=LR)
        for _ in range(STEPS):
            optimizer.step(F.cross_entropy(head(support[j]), e.y_support[j]))
        total = total + F.cross_entropy(head(query[j]), e.y_query[j])
    return total / EPISODES


def heads(impl: str):
    """The function (episodes, support features, query features) -> outer loss of `impl`."""
    if impl.startswith("bilevel:reverse-"):
        return functools.partial(bilevel_heads, impl.removeprefix("bilevel:reverse-"))
    return {
        "torch:unroll-batched": batched_heads,
        "torch:unroll-loop": looped_heads,
        "higher": higher_heads,
        "torchopt": torchopt_heads,
    }[impl]


# -- the timed meta-iteration ---------------------------------------------------------------
def build(impl: str, size: dict, device: str):
    e, net = episodes(device), network().to(device)
    if impl == LOWER_BOUND:
        classifier = nn.Linear(FEATURES, WAYS).to(device)
        optimizer = torch.optim.Adam([*net.parameters(), *classifier.parameters()], lr=1e-3)
        return functools.partial(supervised_step, e, net, classifier, optimizer)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    return functools.partial(meta_step, heads(impl), e, net, optimizer)


def meta_step(outer, e: Episodes, net: nn.Module, optimizer) -> Tensor:
    """One meta-iteration; returns the hypergradient of the representation (for the error)."""
    optimizer.zero_grad(set_to_none=True)
    support, query = split(net(e.images))
    outer(e, support, query).backward()
    grads = flat([p.grad for p in net.parameters()])
    optimizer.step()
    return grads


def supervised_step(e: Episodes, net: nn.Module, classifier: nn.Module, optimizer) -> None:
    """The lower bound: one plain supervised step of the same network on the same images."""
    labels = torch.cat([e.y_support.flatten(), e.y_query.flatten()])
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(classifier(net(e.images)), labels).backward()
    optimizer.step()


def reference(size: dict) -> Tensor:
    """The representation's hypergradient in float64, with hand-written batched heads."""
    net = copy.deepcopy(network()).double()
    e = episodes("cpu", torch.float64)
    support, query = split(net(e.images))
    batched_heads(e, support, query).backward()
    return flat([p.grad for p in net.parameters()])
