"""W3, forward mode: the hypergradient with respect to the learning rate, momentum and weight
decay (m = 3 scalars) of an MLP 784-300-10 trained by minibatch SGD with momentum (batches of
100 in a fixed order) for T = 200 and 2000 steps; validation loss on 5000 examples.

The inner objective takes the step index, `inner(params, hparams, t)`, and picks its batch by t,
so the replaying policies (trajectory, checkpoint) see the same batches again.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jvp

import bilevel

from .common import LOWER_BOUND, Impl, classification_data

N, N_VAL, BATCH, HIDDEN = 5000, 5000, 100, 300
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-3
GRAPH_MAX_T = 200  # a kept graph is ~4 MB per step here: 8 GB at T = 2000


def sizes(mode: str) -> list[dict]:
    return [{"T": 200}] if mode == "quick" else [{"T": 200}, {"T": 2000}]


def repetitions(mode: str, size: dict) -> tuple[int, int]:
    return (1, 2) if mode == "quick" or size["T"] > 200 else (1, 3)


def warmup_size(size: dict) -> dict:
    return {"T": min(size["T"], 10)}


def implementations(size: dict) -> list[Impl]:
    graph = size["T"] <= GRAPH_MAX_T
    too_big = None if graph else f"not run: a kept graph needs ~{size['T'] * 4 // 1000} GB"
    return [
        Impl(LOWER_BOUND, note="T steps of SGD with momentum, no graph"),
        Impl("bilevel:forward", note="m=3 tangents, batched backward passes"),
        Impl("bilevel:forward-loop", note="vectorize=False"),
        Impl("bilevel:reverse-graph", skip=too_big),
        Impl("bilevel:reverse-trajectory"),
        Impl("bilevel:reverse-checkpoint"),
        Impl("torch:unroll", skip=too_big),
        Impl("higher", "higher", note="override lr, momentum, weight_decay", skip=too_big),
    ]


@dataclass(frozen=True)
class Data:
    X: Tensor
    y: Tensor
    X_val: Tensor
    y_val: Tensor
    w0: dict  # the fixed initial weights


@functools.cache
def data(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Data:
    X, y, X_val, y_val = classification_data(N, N_VAL, seed=3)
    g = torch.Generator().manual_seed(4)
    w0 = {
        "W1": torch.randn(HIDDEN, 784, generator=g) * math.sqrt(2 / 784),
        "b1": torch.zeros(HIDDEN),
        "W2": torch.randn(10, HIDDEN, generator=g) * math.sqrt(1 / HIDDEN),
        "b2": torch.zeros(10),
    }
    w0 = {k: v.to(device, dtype) for k, v in w0.items()}
    return Data(X.to(device, dtype), y.to(device), X_val.to(device, dtype), y_val.to(device), w0)


def hparams(d: Data) -> dict[str, Tensor]:
    values = {"log_lr": math.log(LR), "logit_mu": math.log(MOMENTUM / (1 - MOMENTUM)),
              "log_wd": math.log(WEIGHT_DECAY)}  # fmt: skip
    return {k: d.X.new_tensor(v).requires_grad_(True) for k, v in values.items()}


def settings(h) -> tuple[Tensor, Tensor, Tensor]:
    return h["log_lr"].exp(), torch.sigmoid(h["logit_mu"]), h["log_wd"].exp()


def mlp(p, x: Tensor) -> Tensor:
    return F.linear(F.relu(F.linear(x, p["W1"], p["b1"])), p["W2"], p["b2"])


def batch_loss(p, d: Data, t: int) -> Tensor:
    """The training loss on minibatch t (1-based, cycling through the training set)."""
    start = (t - 1) % (N // BATCH) * BATCH
    return F.cross_entropy(mlp(p, d.X[start : start + BATCH]), d.y[start : start + BATCH])


def val_loss(p, d: Data) -> Tensor:
    return F.cross_entropy(mlp(p, d.X_val), d.y_val)


def build(impl: str, size: dict, device: str):
    d, T = data(device), size["T"]
    if impl == LOWER_BOUND:
        return functools.partial(inner_training, d, T)
    if impl.startswith("bilevel:"):
        return functools.partial(bilevel_hypergradient, d, T, impl.removeprefix("bilevel:"))
    return functools.partial({"torch:unroll": torch_unroll, "higher": higher_unroll}[impl], d, T)


def inner_training(d: Data, T: int) -> None:
    params = {k: v.clone().requires_grad_(True) for k, v in d.w0.items()}
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(1, T + 1):
        grads = torch.autograd.grad(batch_loss(params, d, t), list(params.values()))
        with torch.no_grad():
            for (k, w), g in zip(params.items(), grads):
                velocity[k] = MOMENTUM * velocity[k] + g + WEIGHT_DECAY * w
                w -= LR * velocity[k]


def bilevel_hypergradient(d: Data, T: int, method: str) -> Tensor:
    dynamics = bilevel.sgd(
        lr=lambda h: settings(h)[0], momentum=lambda h: settings(h)[1],
        weight_decay=lambda h: settings(h)[2],
    )  # fmt: skip
    options = {
        "forward": {"method": "forward"},
        "forward-loop": {"method": "forward", "vectorize": False},
        "reverse-graph": {"method": "reverse", "memory": "graph"},
        "reverse-trajectory": {"method": "reverse", "memory": "trajectory"},
        "reverse-checkpoint": {"method": "reverse", "memory": "checkpoint"},
    }[method]
    result = bilevel.hypergradient(
        lambda p, h, t: batch_loss(p, d, t), lambda p, h: val_loss(p, d),
        dict(d.w0), hparams(d), dynamics, T, **options,
    )  # fmt: skip
    return torch.stack([result.grads[k] for k in ("log_lr", "logit_mu", "log_wd")])


def torch_unroll(d: Data, T: int) -> Tensor:
    h = hparams(d)
    lr, mu, wd = settings(h)
    params = {k: v.clone().requires_grad_(True) for k, v in d.w0.items()}
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(1, T + 1):
        grads = torch.autograd.grad(
            batch_loss(params, d, t), list(params.values()), create_graph=True
        )
        for (k, w), g in zip(list(params.items()), grads):
            velocity[k] = mu * velocity[k] + g + wd * w
            params[k] = w - lr * velocity[k]
    return torch.stack(torch.autograd.grad(val_loss(params, d), list(h.values())))


def higher_unroll(d: Data, T: int) -> Tensor:
    import higher

    h = hparams(d)
    lr, mu, wd = settings(h)
    model = _Mlp(d)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    override = {"lr": [lr], "momentum": [mu], "weight_decay": [wd]}
    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True, override=override) as (
        fmodel,
        diffopt,
    ):
        for t in range(1, T + 1):
            start = (t - 1) % (N // BATCH) * BATCH
            logits = fmodel(d.X[start : start + BATCH])
            diffopt.step(F.cross_entropy(logits, d.y[start : start + BATCH]))
        loss = F.cross_entropy(fmodel(d.X_val), d.y_val)
        return torch.stack(torch.autograd.grad(loss, list(h.values())))


class _Mlp(torch.nn.Module):
    def __init__(self, d: Data):
        super().__init__()
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in d.w0.items()})

    def forward(self, x):
        return mlp(self.p, x)


def reference(size: dict) -> Tensor:
    """The three hypergradients in float64 by hand-written forward mode (one jvp per step and
    direction), independent of the engine."""
    d, T = data("cpu", torch.float64), size["T"]
    h0 = {k: v.detach() for k, v in hparams(d).items()}
    w_T = None
    columns = []
    for name in h0:
        direction = {
            k: torch.zeros_like(v) if k != name else torch.ones_like(v) for k, v in h0.items()
        }
        w_T, tangent = _forward_column(d, T, h0, direction)
        columns.append(tangent)
    g = torch.func.grad(lambda p: val_loss(p, d))(w_T)
    return torch.stack([sum((g[k] * t[k]).sum() for k in g) for t in columns])


def _forward_column(d: Data, T: int, h0, direction):
    params = dict(d.w0)
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    tangent = (zeros, zeros)
    for t in range(1, T + 1):

        def step(p, v, h, t=t):
            lr, mu, wd = settings(h)
            g = grad(lambda q: batch_loss(q, d, t))(p)
            v = {k: mu * v[k] + g[k] + wd * p[k] for k in p}
            return {k: p[k] - lr * v[k] for k in p}, v

        (params, velocity), tangent = jvp(step, (params, velocity, h0), (*tangent, direction))
    return params, tangent[0]
