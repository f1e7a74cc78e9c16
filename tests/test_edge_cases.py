"""Edge cases found by a review of the engine: each test failed before its fix."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel.hypergrad import linear

DTYPE = torch.float64


def regression(dtype=DTYPE):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=g, dtype=dtype)
    return X, torch.randn(30, generator=g, dtype=dtype)


X, Y = regression()


def fit(p, h):
    return ((X @ p["w"] - Y) ** 2).mean() + (h["decay"].exp() * p["w"] ** 2).sum()


def noisy_init(h):  # a reparameterised random initialisation: Phi_0 draws
    return {"w": h["mu"] + h["log_sigma"].exp() * torch.randn(4, dtype=DTYPE)}


def init_hparams():
    return {
        "mu": torch.ones(4, dtype=DTYPE, requires_grad=True),
        "log_sigma": torch.zeros(4, dtype=DTYPE, requires_grad=True),
    }


def unrolled_with_the_same_draw(seed, lr=0.05, steps=5):
    torch.manual_seed(seed)
    h = {k: v.detach().requires_grad_(True) for k, v in init_hparams().items()}
    w = noisy_init(h)["w"]
    for _ in range(steps):
        (g,) = torch.autograd.grad(((X @ w - Y) ** 2).mean(), w, create_graph=True)
        w = w - lr * g
    return torch.autograd.grad((w**2).sum(), [h["mu"], h["log_sigma"]])


@pytest.mark.parametrize("memory", ["graph", "trajectory"])
def test_a_random_learned_initialisation_is_pulled_back_through_its_own_draw(memory):
    def inner(p, h):
        return ((X @ p["w"] - Y) ** 2).mean()

    torch.manual_seed(0)
    result = bilevel.hypergradient(
        inner, lambda p, h: (p["w"] ** 2).sum(), noisy_init, init_hparams(),
        bilevel.sgd(lr=0.05), 5, memory=memory,
    )  # fmt: skip
    mu, log_sigma = unrolled_with_the_same_draw(0)
    torch.testing.assert_close(result.grads["mu"], mu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.grads["log_sigma"], log_sigma, rtol=1e-12, atol=1e-14)


def test_check_passes_with_a_random_learned_initialisation():
    def inner(p, h):
        return ((X @ p["w"] - Y) ** 2).mean()

    torch.manual_seed(0)
    report = bilevel.check(
        inner, lambda p, h: (p["w"] ** 2).sum(), noisy_init, init_hparams(),
        bilevel.sgd(lr=0.05), 5, method="forward",
    )  # fmt: skip
    assert report.passed(1e-6), report


@pytest.mark.parametrize("method", ["implicit-cg", "reverse"])
def test_a_nan_gradient_of_the_outer_objective_is_named_not_zeroed(method):
    def outer(p, h):  # finite value, NaN derivative (sqrt at 0 through where)
        w = p["w"]
        return torch.where(w > 100, torch.sqrt((w - 100).clamp(min=0)), w**2).sum() + (
            torch.sqrt(w[0] * 0)
        )

    hparams = {"decay": torch.tensor(-1.0, dtype=DTYPE, requires_grad=True)}
    with pytest.raises(bilevel.HypergradientError, match="gradient of the outer objective"):
        bilevel.hypergradient(
            fit, outer, {"w": torch.zeros(4, dtype=DTYPE)}, hparams, bilevel.sgd(lr=0.1), 50,
            method,
        )  # fmt: skip


@pytest.mark.parametrize("name", [*linear.SOLVERS, "neumann", "fixed-point"])
def test_a_non_finite_right_hand_side_gives_nan_not_zeros(name):
    b = (torch.tensor([1.0, float("nan")], dtype=DTYPE),)

    def matvec(v):
        return tuple(2 * x for x in v)

    if name == "neumann":
        x, info = linear.neumann(matvec, b, step=lambda v: v, iterations=5, tolerance=1e-10)
    elif name == "fixed-point":
        x, info = linear.fixed_point(matvec, b, iterations=5, tolerance=1e-10)
    else:
        x, info = linear.SOLVERS[name](matvec, b, iterations=5, tolerance=1e-10, rmatvec=matvec)
    assert bool(x[0].isnan().all()) and not info["converged"]


def test_an_accurate_float32_implicit_solve_does_not_warn():
    X32, Y32 = regression(torch.float32)

    def inner(p, h):
        return ((X32 @ p["w"] - Y32) ** 2).mean() + (h["decay"].exp() * p["w"] ** 2).sum()

    hparams = {"decay": torch.tensor(-1.0, requires_grad=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("implicit-cg", "implicit-neumann"):
            result = bilevel.hypergradient(
                inner, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.zeros(4)}, hparams,
                bilevel.sgd(lr=0.1), 500, method,
            )  # fmt: skip
            assert result.info["converged"]


def test_the_fixed_point_solver_reports_the_true_residual_of_a_slow_contraction():
    rho, b = 0.999, (torch.ones(3, dtype=DTYPE),)

    def transpose_jacobian(v):
        return tuple(rho * x for x in v)

    x, info = linear.fixed_point(transpose_jacobian, b, iterations=100_000, tolerance=1e-6)
    true = float(((1 - rho) * x[0] - b[0]).norm() / b[0].norm())
    assert info["converged"] and true <= 1.01 * info["residual"] + 1e-15
    assert true < 1e-5


def test_solve_with_an_implicit_method_and_no_hyperparameters():
    w0 = torch.zeros(4, dtype=DTYPE, requires_grad=True)
    w = bilevel.solve(
        lambda p, h: ((X @ p["w"] - Y) ** 2).mean() + 0.1 * (p["w"] ** 2).sum(),
        {"w": w0}, {}, bilevel.sgd(lr=0.1), 200, "implicit-cg",
    )  # fmt: skip
    (w["w"] ** 2).sum().backward()  # w* does not depend on w_0: no gradient, no crash
    assert w0.grad is None


def noisy_fit(p, h):  # draws, as dropout would
    return fit(p, h) + 1e-3 * (torch.randn(4, dtype=DTYPE) * p["w"]).sum()


def test_the_unused_hyperparameter_probe_draws_no_random_numbers():
    hparams = {
        "decay": torch.tensor(-1.0, dtype=DTYPE, requires_grad=True),
        "forgotten": torch.zeros((), dtype=DTYPE, requires_grad=True),
    }
    outcomes = []
    for probe in (False, True):
        torch.manual_seed(3)
        h = hparams if probe else {"decay": hparams["decay"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bilevel.HypergradientWarning)
            bilevel.hypergradient(
                noisy_fit, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.zeros(4, dtype=DTYPE)},
                h, bilevel.sgd(lr=0.1), 5,
            )  # fmt: skip
        outcomes.append(torch.rand(3))
    torch.testing.assert_close(outcomes[0], outcomes[1])
