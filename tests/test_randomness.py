"""Randomness in the inner model (dropout): replayed steps must draw what they first drew.

Reverse mode with the trajectory and checkpoint policies replays steps on the way back; a
replay that draws a new dropout mask differentiates another trajectory than the one it ran,
and the hypergradient is silently wrong. The graph policy never replays, so it is the reference
(and equals a plain unroll by autograd).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel

DTYPE = torch.float64


def dropout_problem(device="cpu"):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 5, generator=g, dtype=DTYPE), torch.randn(32, generator=g, dtype=DTYPE)
    Xv = torch.randn(16, 5, generator=g, dtype=DTYPE)
    yv = torch.randn(16, generator=g, dtype=DTYPE)
    X, y, Xv, yv = (v.to(device) for v in (X, y, Xv, yv))
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1)).double()
    net = net.to(device)
    params, apply = bilevel.functional(net)

    def inner(p, h):
        residual = apply(p, X).squeeze(-1) - y
        decay = sum((w**2).sum() for w in p.values())
        return (residual**2).mean() + h["log_decay"].exp() * decay

    def outer(p, h):
        return ((apply(p, Xv).squeeze(-1) - yv) ** 2).mean()

    hparams = {"log_decay": torch.tensor(-2.0, dtype=DTYPE, device=device, requires_grad=True)}
    return inner, outer, params, hparams


def unrolled_by_autograd(inner, outer, params, hparams, lr, steps):
    """The reference: a plain unroll, differentiated by autograd."""
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(steps):
        loss = inner(w, hparams)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {k: v - lr * g for (k, v), g in zip(w.items(), grads)}
    return torch.autograd.grad(outer(w, hparams), hparams["log_decay"])[0]


def hypergradient(method, **options):
    inner, outer, params, hparams = dropout_problem()
    torch.manual_seed(7)
    result = bilevel.hypergradient(
        inner, outer, params, hparams, bilevel.sgd(lr=0.2), 12, method, **options
    )
    return result.grads["log_decay"]


@pytest.mark.parametrize(
    "method, options",
    [
        ("reverse", {"memory": "graph"}),
        ("reverse", {"memory": "trajectory"}),
        ("reverse", {"memory": "checkpoint"}),
        ("reverse", {"memory": "checkpoint", "checkpoint_every": 5}),
        ("truncated", {"k": 12, "memory": "trajectory"}),
        ("reverse", {"memory": "activations"}),
        ("truncated", {"k": 12, "memory": "activations"}),
    ],
)
def test_dropout_replays_give_the_plain_unroll(method, options):
    inner, outer, params, hparams = dropout_problem()
    torch.manual_seed(7)
    reference = unrolled_by_autograd(inner, outer, params, hparams, 0.2, 12)
    assert abs(float(reference)) > 1e-4  # the test means something
    torch.testing.assert_close(hypergradient(method, **options), reference, rtol=1e-10, atol=0)


def test_replays_leave_the_global_random_state_where_the_run_left_it():
    inner, outer, params, hparams = dropout_problem()
    torch.manual_seed(7)
    bilevel.hypergradient(inner, outer, params, hparams, bilevel.sgd(lr=0.2), 12, "reverse")
    after_graph = torch.rand(3)
    torch.manual_seed(7)
    bilevel.hypergradient(
        inner, outer, params, hparams, bilevel.sgd(lr=0.2), 12, "reverse", memory="trajectory"
    )
    torch.testing.assert_close(torch.rand(3), after_graph)


def test_dropout_through_the_solve_node_with_checkpoints():
    inner, outer, params, hparams = dropout_problem()
    torch.manual_seed(7)
    reference = unrolled_by_autograd(inner, outer, params, hparams, 0.2, 12)
    torch.manual_seed(7)
    w = bilevel.solve(inner, params, hparams, bilevel.sgd(lr=0.2), 12, memory="checkpoint")
    (grad,) = torch.autograd.grad(outer(w, hparams), hparams["log_decay"])
    torch.testing.assert_close(grad, reference, rtol=1e-10, atol=0)


def test_check_compares_against_finite_differences_with_the_same_masks():
    inner, outer, params, hparams = dropout_problem()
    torch.manual_seed(7)
    report = bilevel.check(
        inner, outer, params, hparams, bilevel.sgd(lr=0.2), 12, memory="trajectory"
    )
    assert report.passed(1e-6), report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory", ["trajectory", "checkpoint"])
def test_dropout_replays_on_cuda_draw_the_masks_of_the_graph_policy(memory):
    """The CUDA generator's state is stored and restored with each segment start."""
    grads = {}
    for policy in ("graph", memory):
        inner, outer, params, hparams = dropout_problem("cuda")
        torch.manual_seed(7)
        result = bilevel.hypergradient(
            inner, outer, params, hparams, bilevel.sgd(lr=0.2), 12, memory=policy
        )
        grads[policy] = result.grads["log_decay"]
    assert abs(float(grads["graph"])) > 1e-4
    torch.testing.assert_close(grads[memory], grads["graph"], rtol=1e-10, atol=0)
