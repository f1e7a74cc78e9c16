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
