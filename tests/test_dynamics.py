"""The inner optimisers: same trajectories as torch.optim, finite derivatives everywhere."""

import pytest
import torch

import bilevel

from .problems import DTYPE, SmallMLP, relative_error


def _run_ours(dynamics, mlp, steps):
    params, state = dict(mlp.w0), dynamics.init(mlp.w0)
    for t in range(1, steps + 1):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = dict(
            zip(leaves, torch.autograd.grad(mlp.inner(leaves, None), list(leaves.values())))
        )
        params, state = dynamics.step(params, state, grads, {}, t)
    return params


def _run_torch(optimizer_class, mlp, steps, **settings):
    leaves = {k: v.clone().requires_grad_(True) for k, v in mlp.w0.items()}
    optimizer = optimizer_class(leaves.values(), **settings)
    for _ in range(steps):
        optimizer.zero_grad()
        mlp.inner(leaves, None).backward()
        optimizer.step()
    return leaves


@pytest.mark.parametrize(
    "ours,theirs,settings",
    [
        (bilevel.sgd(lr=0.1), torch.optim.SGD, {"lr": 0.1}),
        (
            bilevel.sgd(lr=0.1, weight_decay=0.01),
            torch.optim.SGD,
            {"lr": 0.1, "weight_decay": 0.01},
        ),
        (bilevel.sgd(lr=0.1, momentum=0.9), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (
            bilevel.nesterov(lr=0.1, momentum=0.9, weight_decay=0.01),
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        ),
        (
            bilevel.adam(lr=0.01, weight_decay=0.01),
            torch.optim.Adam,
            {"lr": 0.01, "weight_decay": 0.01},
        ),
        (
            bilevel.adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
            torch.optim.Adam,
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
        ),
        (
            bilevel.adamw(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5),
            torch.optim.AdamW,
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.5},
        ),
        (bilevel.adamw(lr=0.01), torch.optim.AdamW, {"lr": 0.01}),
        *(
            (
                bilevel.rmsprop(**settings),
                torch.optim.RMSprop,
                settings,
            )
            for settings in (
                {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.05},
                {"lr": 0.01, "momentum": 0.8, "weight_decay": 0.05},
                {"lr": 0.01, "alpha": 0.95, "centered": True},
                {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.05},
            )
        ),
        (
            bilevel.adagrad(
                lr=0.1, lr_decay=0.05, weight_decay=0.05, initial_accumulator_value=0.3, eps=1e-6
            ),
            torch.optim.Adagrad,
            {
                "lr": 0.1,
                "lr_decay": 0.05,
                "weight_decay": 0.05,
                "initial_accumulator_value": 0.3,
                "eps": 1e-6,
            },
        ),
        (bilevel.adagrad(lr=0.1), torch.optim.Adagrad, {"lr": 0.1}),
    ],
)
def test_dynamics_follow_torch_optim(ours, theirs, settings):
    mlp = SmallMLP()
    a, b = _run_ours(ours, mlp, 25), _run_torch(theirs, mlp, 25, **settings)
    for k in a:
        assert relative_error(a[k], b[k].detach()) < 1e-12, k


@pytest.mark.filterwarnings("ignore::bilevel.SolverWarning")  # 20 steps: far from a fixed point
@pytest.mark.parametrize("method", ["reverse", "forward", "fixed-point"])
def test_adam_hypergradient_is_finite_when_gradient_entries_are_exactly_zero(method):
    """A parameter the inner loss never touches has gradient exactly 0 at every step."""
    x = torch.randn(10, 3, dtype=DTYPE)

    def inner(p, h):
        return ((x @ p["w"] - 1.0) ** 2).mean()  # p["unused"] and w[...] stay at grad 0?

    def outer(p, h):
        return ((x @ p["w"]) ** 2).mean() + (p["unused"] ** 2).sum()

    params = {"w": torch.zeros(3, dtype=DTYPE), "unused": torch.zeros(2, dtype=DTYPE)}
    hparams = {"log_lr": torch.tensor(-3.0, dtype=DTYPE, requires_grad=True)}
    dynamics = bilevel.adam(lr=lambda h: h["log_lr"].exp())
    result = bilevel.hypergradient(inner, outer, params, hparams, dynamics, 20, method)
    assert torch.isfinite(result.grads["log_lr"])
    assert result.grads["log_lr"] != 0


def test_adam_zero_gradient_entries_match_finite_differences():
    x = torch.randn(10, 3, dtype=DTYPE)
    x[:, 2] = 0  # the third weight has gradient exactly 0

    def inner(p, h):
        return ((x @ p["w"] - h["target"]) ** 2).mean()

    def outer(p, h):
        return (p["w"] ** 2).sum()

    params = {"w": torch.zeros(3, dtype=DTYPE)}
    hparams = {"target": torch.tensor(1.0, dtype=DTYPE, requires_grad=True)}
    for method in ("reverse", "forward"):
        report = bilevel.check(inner, outer, params, hparams, bilevel.adam(lr=0.05), 15, method)
        assert report.passed(1e-7), str(report)


def test_settings_are_floats_or_callables_with_per_group_values():
    mlp = SmallMLP()
    h = mlp.hparams()
    dynamics = bilevel.sgd(lr=lambda h: h["log_lr"].exp(), weight_decay=mlp.weight_decay)
    grads = {k: torch.ones_like(v) for k, v in mlp.w0.items()}
    new, _ = dynamics.step(mlp.w0, (), grads, h, 1)
    lr, wd = float(h["log_lr"].exp().detach()), h["log_wd"].exp().detach()
    expected_b1 = mlp.w0["b1"] - lr * (1 + float(wd[1]) * mlp.w0["b1"])
    assert torch.allclose(new["b1"], expected_b1)
    expected_w1 = mlp.w0["W1"] - lr * (1 + float(wd[0]) * mlp.w0["W1"])
    assert torch.allclose(new["W1"], expected_w1)


def test_per_group_setting_missing_a_parameter_is_named():
    dynamics = bilevel.sgd(lr=lambda h: {"W1": 0.1})
    mlp = SmallMLP()
    grads = {k: torch.ones_like(v) for k, v in mlp.w0.items()}
    with pytest.raises(KeyError, match="'b1'"):
        dynamics.step(mlp.w0, (), grads, {}, 1)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: bilevel.sgd(lr=-1.0), "lr must be a finite number >= 0"),
        (lambda: bilevel.sgd(lr="fast"), "lr must be a float or a callable"),
        (lambda: bilevel.sgd(lr=0.1, momentum=-0.5), "momentum must be a finite number >= 0"),
        (lambda: bilevel.sgd(lr=0.1, nesterov=True), "nesterov=True needs a momentum"),
        (lambda: bilevel.adam(lr=0.1, betas=(0.9,)), "betas must be a pair"),
        (lambda: bilevel.adam(lr=0.1, eps=-1.0), "eps must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
