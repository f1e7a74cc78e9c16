"""W1, data hyper-cleaning: the hypergradient of the validation loss with respect to one weight
per training example, sigmoid(lambda_i), after T full-batch gradient steps from zero on a
linear softmax model (5000 x 784 training and validation inputs, 10 classes, lr 0.1)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel

from .common import LOWER_BOUND, Impl, classification_data

N, N_VAL, DIM, CLASSES, LR = 5000, 5000, 784, 10, 0.1
POLICIES = ("graph", "activations", "trajectory", "checkpoint")
SAVING = ("trajectory", "checkpoint")  # the only policies that fit T = 10,000 (graph: ~10 GB)


def sizes(mode: str) -> list[dict]:
    return [{"T": 100}] if mode == "quick" else [{"T": 100}, {"T": 1000}, {"T": 10000}]


def repetitions(mode: str, size: dict) -> tuple[int, int]:
    """(warm-up runs, timed runs)."""
    if size["T"] >= 10000:
        return 1, 1  # the warm-up is T=10
    return (1, 2) if mode == "quick" else (1, 3)


def warmup_size(size: dict) -> dict:
    return {"T": min(size["T"], 10)}


def implementations(size: dict) -> list[Impl]:
    small = size["T"] <= 1000
    rows = [Impl(LOWER_BOUND, note="T steps without any graph")]
    rows += [Impl(f"bilevel:reverse-{p}") for p in (POLICIES if small else SAVING)]
    if small:
        rows += [Impl("torch:unroll"), Impl("higher", "higher"), Impl("torchopt", "torchopt")]
    return rows


@dataclass(frozen=True)
class Data:
    X: Tensor
    y: Tensor
    X_val: Tensor
    y_val: Tensor
    lam: Tensor  # the hyperparameters at which the hypergradient is taken


@functools.cache
def data(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Data:
    X, y, X_val, y_val = classification_data(N, N_VAL, DIM, CLASSES)
    lam = torch.randn(N, generator=torch.Generator().manual_seed(1))
    real = functools.partial(torch.Tensor.to, device=device, dtype=dtype)
    return Data(real(X), y.to(device), real(X_val), y_val.to(device), real(lam))


def train_loss(W: Tensor, b: Tensor, lam: Tensor, d: Data) -> Tensor:
    return (torch.sigmoid(lam) * F.cross_entropy(F.linear(d.X, W, b), d.y, reduction="none")).mean()


def val_loss(W: Tensor, b: Tensor, d: Data) -> Tensor:
    return F.cross_entropy(F.linear(d.X_val, W, b), d.y_val)


def zeros(d: Data, requires_grad: bool = False) -> tuple[Tensor, Tensor]:
    like = d.X
    W = like.new_zeros(CLASSES, DIM, requires_grad=requires_grad)  # nn.Linear's layout
    return W, like.new_zeros(CLASSES, requires_grad=requires_grad)


def build(impl: str, size: dict, device: str):
    d, T = data(device), size["T"]
    if impl == LOWER_BOUND:
        return lambda: inner_training(d, T)
    if impl.startswith("bilevel:reverse-"):
        return functools.partial(bilevel_reverse, d, T, impl.removeprefix("bilevel:reverse-"))
    builders = {"torch:unroll": torch_unroll, "higher": higher_unroll, "torchopt": torchopt_unroll}
    return functools.partial(builders[impl], d, T)


def inner_training(d: Data, T: int, weight_decay: float = 0.0) -> tuple[Tensor, Tensor]:
    """The lower bound: T plain gradient steps, one step's graph at a time."""
    W, b = zeros(d, requires_grad=True)
    lam = d.lam.detach()
    for _ in range(T):
        gW, gb = torch.autograd.grad(train_loss(W, b, lam, d), (W, b))
        with torch.no_grad():
            W -= LR * (gW + weight_decay * W)
            b -= LR * (gb + weight_decay * b)
    return W.detach(), b.detach()


def objectives(d: Data):
    def inner(p, h):
        return train_loss(p["W"], p["b"], h["lam"], d)

    def outer(p, h):
        return val_loss(p["W"], p["b"], d)

    return inner, outer


def bilevel_reverse(d: Data, T: int, policy: str) -> Tensor:
    inner, outer = objectives(d)
    W, b = zeros(d)
    result = bilevel.hypergradient(
        inner, outer, {"W": W, "b": b}, {"lam": d.lam.clone().requires_grad_(True)},
        dynamics=bilevel.sgd(lr=LR), steps=T, method="reverse", memory=policy,
    )  # fmt: skip
    return result.grads["lam"]


def torch_unroll(d: Data, T: int) -> Tensor:
    """Plain autograd through the T steps (create_graph=True), written by hand."""
    lam = d.lam.clone().requires_grad_(True)
    W, b = zeros(d, requires_grad=True)
    for _ in range(T):
        gW, gb = torch.autograd.grad(train_loss(W, b, lam, d), (W, b), create_graph=True)
        W, b = W - LR * gW, b - LR * gb
    return torch.autograd.grad(val_loss(W, b, d), lam)[0]


def zero_linear(d: Data) -> nn.Linear:
    model = nn.Linear(DIM, CLASSES).to(d.X)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def module_losses(d: Data, lam: Tensor):
    def train(model) -> Tensor:
        return (torch.sigmoid(lam) * F.cross_entropy(model(d.X), d.y, reduction="none")).mean()

    def val(model) -> Tensor:
        return F.cross_entropy(model(d.X_val), d.y_val)

    return train, val


def higher_unroll(d: Data, T: int) -> Tensor:
    import higher

    lam = d.lam.clone().requires_grad_(True)
    train, val = module_losses(d, lam)
    model = zero_linear(d)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(T):
            diffopt.step(train(fmodel))
        return torch.autograd.grad(val(fmodel), lam)[0]


def torchopt_unroll(d: Data, T: int) -> Tensor:
    import torchopt

    lam = d.lam.clone().requires_grad_(True)
    train, val = module_losses(d, lam)
    model = zero_linear(d)
    optimizer = torchopt.MetaSGD(model, lr=LR)
    for _ in range(T):
        optimizer.step(train(model))
    return torch.autograd.grad(val(model), lam)[0]


def reference(size: dict) -> Tensor:
    """d f_T / d lambda in float64 by a hand-written reverse pass that stores w_0..w_T and
    replays one step at a time (memory T*d, so T = 10,000 fits)."""
    d, T = data("cpu", torch.float64), size["T"]
    lam = d.lam.clone().requires_grad_(True)
    trajectory = [zeros(d)]
    for _ in range(T - 1):
        trajectory.append(_step(d, *trajectory[-1], lam.detach(), graph=False))
    W, b = (v.requires_grad_(True) for v in _step(d, *trajectory[-1], lam.detach(), graph=False))
    adjoint = torch.autograd.grad(val_loss(W, b, d), (W, b))
    total = torch.zeros_like(lam)
    for W, b in reversed(trajectory):
        W, b = W.requires_grad_(True), b.requires_grad_(True)
        *adjoint, g_lam = torch.autograd.grad(_step(d, W, b, lam, graph=True), (W, b, lam), adjoint)
        total += g_lam
    return total


def _step(d: Data, W: Tensor, b: Tensor, lam: Tensor, graph: bool):
    if not graph:
        W, b = W.detach().requires_grad_(True), b.detach().requires_grad_(True)
    gW, gb = torch.autograd.grad(train_loss(W, b, lam, d), (W, b), create_graph=graph)
    W_next, b_next = W - LR * gW, b - LR * gb
    return (W_next, b_next) if graph else (W_next.detach(), b_next.detach())
