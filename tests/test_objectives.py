"""What the engine passes to the user's objectives, and what it says when they misbehave."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel.hypergrad.problem import with_step

DTYPE = torch.float64


def seen_by(objective):
    """The arguments `objective` receives at step 3."""
    return with_step(objective)({"w": 1}, {"h": 2}, 3)


def test_a_third_parameter_with_a_default_is_not_given_the_step():
    assert seen_by(lambda p, h, scale=1.0: scale) == 1.0


@pytest.mark.parametrize(
    "objective",
    [
        lambda p, h, t: t,  # a third positional parameter without a default
        lambda p, h, step: step,
        lambda p, h, *, step: step,  # declared by name, keyword-only
        lambda p, h, scale=1.0, step=0: step,
        lambda p, h, t=0: t,  # the conventional name, with a default
    ],
)
def test_the_step_goes_to_objectives_that_declare_it(objective):
    assert seen_by(objective) == 3


def test_var_positional_objectives_are_not_given_the_step():
    assert seen_by(lambda p, h, *rest: len(rest)) == 0


def test_builtins_without_a_signature_get_two_arguments():
    class Callable:
        def __call__(self, p, h):
            return "two"

    assert seen_by(Callable()) == "two"


def regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, 3, generator=g, dtype=DTYPE), torch.randn(20, generator=g, dtype=DTYPE)


X, Y = regression()


def fit(p, h):
    return ((X @ p["w"] - Y) ** 2).mean() + (h["decay"].exp() * p["w"] ** 2).sum()


def distance(p, h):
    return ((p["w"] - 1) ** 2).sum()


def run(inner=fit, outer=distance, hparams=None, method="reverse", steps=5, params=None, **options):
    hparams = hparams or {"decay": torch.zeros((), dtype=DTYPE, requires_grad=True)}
    params = params if params is not None else {"w": torch.zeros(3, dtype=DTYPE)}
    return bilevel.hypergradient(
        inner, outer, params, hparams, bilevel.sgd(lr=0.1), steps, method, **options
    )


@pytest.mark.parametrize("method", ["reverse", "forward", "implicit-cg"])
def test_a_non_differentiable_objective_is_not_called_divergence(method):
    def inner(p, h):  # sqrt at w = 0: a finite value with a NaN gradient at step 1
        return fit(p, h) + (p["w"] ** 2).sum().sqrt()

    with pytest.raises(bilevel.InnerDivergenceError, match="not differentiable") as error:
        run(inner, method=method)
    assert "at step 1 " in str(error.value) and "learning rate" not in str(error.value)


def test_a_nan_from_the_objective_at_finite_parameters_is_named():
    def inner(p, h):  # log of a negative number once w_0 > 0.5
        return fit(p, h) + (0.6 - p["w"][0]).log()

    with pytest.raises(bilevel.InnerDivergenceError, match="returned nan at step") as error:
        run(inner, params={"w": torch.tensor([0.55, 0.0, 0.0], dtype=DTYPE)}, steps=20)
    assert "learning rate" not in str(error.value)


def test_a_nan_learning_rate_from_a_hyperparameter_is_not_blamed_on_the_objective():
    hparams = {"lr": torch.tensor(float("nan"), dtype=DTYPE, requires_grad=True)}
    with pytest.raises(bilevel.InnerDivergenceError, match="inner state became NaN or infinite"):
        bilevel.hypergradient(
            lambda p, h: ((X @ p["w"] - Y) ** 2).mean(),
            distance,
            {"w": torch.zeros(3, dtype=DTYPE)},
            hparams,
            bilevel.sgd(lr=lambda h: h["lr"]),
            5,
        )


def test_a_nan_outer_loss_is_named_as_such():
    def outer(p, h):
        return (p["w"] ** 2).sum() * torch.tensor(float("nan"), dtype=DTYPE)

    with pytest.raises(bilevel.HypergradientError, match="outer objective is nan at w_T"):
        run(outer=outer)


@pytest.mark.parametrize("method", ["reverse", "forward", "implicit-cg"])
def test_a_hyperparameter_nothing_depends_on_is_named(method):
    hparams = {
        "decay": torch.zeros((), dtype=DTYPE, requires_grad=True),
        "forgotten": torch.zeros(2, dtype=DTYPE, requires_grad=True),
    }
    with pytest.warns(bilevel.HypergradientWarning, match=r"hparams\['forgotten'\] affects"):
        result = run(hparams=hparams, method=method, steps=200 if "implicit" in method else 5)
    assert not result.grads["forgotten"].any() and result.grads["decay"].any()


def test_hyperparameters_read_only_by_the_outer_objective_or_w0_are_not_flagged():
    hparams = {
        "decay": torch.zeros((), dtype=DTYPE, requires_grad=True),
        "target": torch.zeros((), dtype=DTYPE, requires_grad=True),
        "start": torch.zeros(3, dtype=DTYPE, requires_grad=True),
    }

    def outer(p, h):  # reads target, with a zero derivative: not a forgotten hyperparameter
        return distance(p, h) + 0 * h["target"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run(outer=outer, hparams=hparams, params=lambda h: {"w": h["start"]})
    assert not result.grads["target"].any()


def test_truncation_says_that_a_learned_initialisation_gets_no_hypergradient():
    hparams = {
        "decay": torch.zeros((), dtype=DTYPE, requires_grad=True),
        "start": torch.zeros(3, dtype=DTYPE, requires_grad=True),
    }
    with pytest.warns(bilevel.HypergradientWarning, match="learned initialisation"):
        result = run(hparams=hparams, params=lambda h: {"w": h["start"]}, method="truncated", k=2)
    assert "learned initialisation" in result.info["note"]
    assert not result.grads["start"].any()
    with warnings.catch_warnings():  # the whole window: no warning
        warnings.simplefilter("error")
        run(hparams=hparams, params=lambda h: {"w": h["start"]}, method="truncated", k=5)
