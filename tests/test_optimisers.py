"""The inner optimisers' settings: bad values are refused with the argument named."""

import math

import pytest

import bilevel

NON_FINITE = [math.nan, math.inf, -math.inf]

# every float setting of every factory, with the keyword that carries it
FLOAT_SETTINGS = [
    (bilevel.sgd, "lr", {}),
    (bilevel.sgd, "momentum", {"lr": 0.1}),
    (bilevel.sgd, "weight_decay", {"lr": 0.1}),
    (bilevel.nesterov, "lr", {"momentum": 0.5}),
    (bilevel.nesterov, "momentum", {"lr": 0.1}),
    (bilevel.nesterov, "weight_decay", {"lr": 0.1, "momentum": 0.5}),
    (bilevel.adam, "lr", {}),
    (bilevel.adam, "eps", {"lr": 0.1}),
    (bilevel.adam, "weight_decay", {"lr": 0.1}),
]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("factory,name,others", FLOAT_SETTINGS)
def test_non_finite_settings_are_refused_by_name(factory, name, others, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        factory(**others, **{name: value})


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("index", [0, 1])
def test_non_finite_betas_are_refused_by_name(index, value):
    betas = [0.9, 0.99]
    betas[index] = value
    with pytest.raises(ValueError, match=rf"^betas\[{index}\] must be a finite number"):
        bilevel.adam(lr=0.1, betas=tuple(betas))
