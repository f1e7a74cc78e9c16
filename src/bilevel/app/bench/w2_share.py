"""W2, the library's own share: the features are computed once outside the timer; a run is only
the 16 episodes' inner steps and the backward pass to the (support and query) features."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import w2_hyperrep as w2
from .common import LOWER_BOUND, Impl, flat

sizes, warmup_size = w2.sizes, w2.warmup_size


def repetitions(mode: str, size: dict) -> tuple[int, int]:
    return (5, 30) if mode == "quick" else (10, 200)


def implementations(size: dict) -> list[Impl]:
    rows = w2.implementations(size)
    return [Impl(LOWER_BOUND, note="T inner steps of the 16 batched heads, no graph"), *rows[1:]]


@functools.cache
def features(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(support, query) features of the episodes, as leaves."""
    net = w2.network().to(device, dtype)
    with torch.no_grad():
        support, query = w2.split(net(w2.episodes(device, dtype).images))
    return support, query


def build(impl: str, size: dict, device: str):
    e, (support, query) = w2.episodes(device), features(device)
    if impl == LOWER_BOUND:
        return functools.partial(inner_steps, e, support)
    return functools.partial(share, w2.heads(impl), e, support, query)


def share(outer, e, support: Tensor, query: Tensor) -> Tensor:
    support, query = support.requires_grad_(True), query.requires_grad_(True)
    return flat(torch.autograd.grad(outer(e, support, query), (support, query)))


def inner_steps(e, support: Tensor) -> None:
    W, b = w2.head_zeros(support, requires_grad=True)
    for _ in range(w2.STEPS):
        gW, gb = torch.autograd.grad(w2.inner_loss(W, b, support, e.y_support), (W, b))
        with torch.no_grad():
            W -= w2.LR * gW
            b -= w2.LR * gb


def reference(size: dict) -> Tensor:
    """From the float32 features cast to float64, so the error is the method's alone."""
    support, query = (f.double() for f in features("cpu"))
    return share(w2.batched_heads, w2.episodes("cpu", torch.float64), support, query)
