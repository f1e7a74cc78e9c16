"""W4, implicit differentiation: W1 with weight decay 0.1 (a strongly convex inner problem) run
to convergence (T = 1000 steps reach float32's floor), and the hypergradient of the exact
solution by implicit-cg, implicit-neumann and fixed-point, and by bilevel.custom_argmin around the
same training loop (the user's own solver, with CG and with GMRES), against torchopt's
custom_root with its conjugate-gradient solver; every solver gets the same tolerance. The error
is measured against the exact hypergradient in float64 (inner problem solved to 1e-13, CG to
1e-13)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

import bilevel

from . import w1_cleaning as w1
from .common import LOWER_BOUND, Impl

WEIGHT_DECAY, TOLERANCE, CG_ITERATIONS, ITERATIONS = 0.1, 1e-6, 100, 500
METHODS = {
    "bilevel:implicit-cg": ("implicit-cg", CG_ITERATIONS),
    "bilevel:implicit-neumann": ("implicit-neumann", ITERATIONS),
    "bilevel:fixed-point": ("fixed-point", ITERATIONS),
}


def sizes(mode: str) -> list[dict]:
    return [{"T": 1000}]


def repetitions(mode: str, size: dict) -> tuple[int, int]:
    return (1, 1) if mode == "quick" else (1, 3)  # the warm-up is T=10


def warmup_size(size: dict) -> dict:
    return {"T": 10}


def implementations(size: dict) -> list[Impl]:
    note = f"tolerance {TOLERANCE:g}"
    return [
        Impl(LOWER_BOUND, note="T inner steps, no graph"),
        Impl("bilevel:implicit-cg", note=f"{note}, ≤ {CG_ITERATIONS} iterations"),
        Impl("bilevel:implicit-neumann", note=f"{note}, ≤ {ITERATIONS} iterations"),
        Impl("bilevel:fixed-point", note=f"{note}, ≤ {ITERATIONS} iterations"),
        Impl("bilevel:custom_argmin-cg", note=f"own solver, {note}, ≤ {CG_ITERATIONS} its"),
        Impl("bilevel:custom_argmin-gmres", note=f"own solver, {note}, ≤ {CG_ITERATIONS} its"),
        Impl("torchopt:implicit-cg", "torchopt", note=f"custom_root + solve_cg, {note}"),
    ]


def build(impl: str, size: dict, device: str):
    d, T = w1.data(device), size["T"]
    if impl == LOWER_BOUND:
        return functools.partial(w1.inner_training, d, T, WEIGHT_DECAY)
    if impl == "torchopt:implicit-cg":
        return functools.partial(torchopt_implicit, d, T)
    if impl.startswith("bilevel:custom_argmin-"):
        return functools.partial(bilevel_custom_argmin, d, T, impl.rsplit("-", 1)[1])
    return functools.partial(bilevel_implicit, d, T, *METHODS[impl])


def bilevel_implicit(d: w1.Data, T: int, method: str, iterations: int) -> Tensor:
    inner, outer = w1.objectives(d)
    W, b = w1.zeros(d)
    result = bilevel.hypergradient(
        inner, outer, {"W": W, "b": b}, {"lam": d.lam.clone().requires_grad_(True)},
        dynamics=bilevel.sgd(lr=w1.LR, weight_decay=WEIGHT_DECAY), steps=T, method=method,
        iterations=iterations, tolerance=TOLERANCE,
    )  # fmt: skip
    return result.grads["lam"]


def bilevel_custom_argmin(d: w1.Data, T: int, linear_solver: str) -> Tensor:
    """The user's own training loop, differentiated implicitly by bilevel.custom_argmin."""
    inner, _ = w1.objectives(d)

    def objective(p, h):  # the inner loss with the loop's weight decay: what it minimises
        decay = sum((v**2).sum() for v in p.values())
        return inner(p, h) + 0.5 * WEIGHT_DECAY * decay

    @bilevel.custom_argmin(
        objective, linear_solver=linear_solver, iterations=CG_ITERATIONS, tolerance=TOLERANCE
    )
    def solver(h):
        with torch.enable_grad():
            W, b = w1.inner_training(d, T, WEIGHT_DECAY)
        return {"W": W, "b": b}

    lam = d.lam.clone().requires_grad_(True)
    p = solver({"lam": lam})
    return torch.autograd.grad(w1.val_loss(p["W"], p["b"], d), lam)[0]


def stationarity(params, lam: Tensor, d: w1.Data):
    """dL/dw + weight decay * w: zero at the inner solution."""
    W, b = params
    gW, gb = torch.autograd.grad(w1.train_loss(W, b, lam, d), (W, b), create_graph=True)
    return gW + WEIGHT_DECAY * W, gb + WEIGHT_DECAY * b


def torchopt_implicit(d: w1.Data, T: int) -> Tensor:
    import torchopt
    from torchopt.diff.implicit import custom_root

    solve = torchopt.linear_solve.solve_cg(maxiter=CG_ITERATIONS, rtol=TOLERANCE)

    def optimality(params, lam):  # torchopt differentiates it with torch.func: no autograd.grad
        W, b = params
        loss = functools.partial(w1.train_loss, lam=lam, d=d)
        gW, gb = torch.func.grad(loss, argnums=(0, 1))(W, b)
        return gW + WEIGHT_DECAY * W, gb + WEIGHT_DECAY * b

    @custom_root(optimality, argnums=1, solve=solve)
    def solver(params, lam):
        with torch.enable_grad():
            return w1.inner_training(d, T, WEIGHT_DECAY)

    lam = d.lam.clone().requires_grad_(True)
    W, b = solver(w1.zeros(d), lam)
    return torch.autograd.grad(w1.val_loss(W, b, d), lam)[0]


def reference(size: dict) -> Tensor:
    """The exact hypergradient in float64: w* by 4000 gradient steps (gradient norm ~1e-13),
    then (Hessian) q = dE/dw by conjugate gradient to 1e-13, and -(d^2 L/d lam dw)^T q."""
    d = w1.data("cpu", torch.float64)
    W, b = (v.requires_grad_(True) for v in w1.inner_training(d, 4000, WEIGHT_DECAY))
    lam = d.lam.clone().requires_grad_(True)
    g = stationarity((W, b), lam, d)
    rhs = torch.autograd.grad(w1.val_loss(W, b, d), (W, b))

    def hessian_times(v):
        return torch.autograd.grad(g, (W, b), v, retain_graph=True)

    q = _conjugate_gradient(hessian_times, rhs, tolerance=1e-13, iterations=1000)
    return -torch.autograd.grad(g, lam, q)[0]


def _conjugate_gradient(matvec, b, tolerance: float, iterations: int):
    def dot(u, v):
        return sum((x * y).sum() for x, y in zip(u, v))

    x = tuple(torch.zeros_like(v) for v in b)
    r = p = b
    rr, stop = dot(r, r), tolerance**2 * float(dot(b, b))
    for _ in range(iterations):
        if float(rr) <= stop:
            break
        ap = matvec(p)
        alpha = rr / dot(p, ap)
        x = tuple(xi + alpha * pi for xi, pi in zip(x, p))
        r = tuple(ri - alpha * ai for ri, ai in zip(r, ap))
        rr, rr_old = dot(r, r), rr
        p = tuple(ri + rr / rr_old * pi for ri, pi in zip(r, p))
    return x
