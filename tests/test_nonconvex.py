"""Every method against central finite differences on a non-convex problem (an MLP)."""

import pytest

import bilevel

from .problems import SmallMLP


@pytest.fixture(scope="module")
def mlp():
    return SmallMLP()


UNROLLED = [
    ("reverse", {}),
    ("reverse", {"memory": "trajectory"}),
    ("reverse", {"memory": "checkpoint"}),
    ("reverse", {"memory": "activations"}),
    ("truncated", {"k": 7}),
    ("forward", {}),
]


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("method,options", UNROLLED)
def test_unrolled_methods_match_finite_differences(mlp, kind, method, options):
    steps = 30
    if method == "truncated":  # the truncated gradient is of f_T only when k = T
        options = {"k": steps}
    report = bilevel.check(
        mlp.inner, mlp.outer, mlp.w0, mlp.hparams(), mlp.dynamics(kind), steps, method, **options
    )
    assert report.passed(1e-7), str(report)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["implicit-cg", "implicit-neumann", "fixed-point"])
def test_implicit_methods_match_finite_differences_at_convergence(mlp, method):
    """Near a strict minimum, the implicit estimate of grad f matches finite differences of
    f_T for a T large enough that f_T = f to many digits."""
    dynamics = bilevel.sgd(lr=lambda h: h["log_lr"].exp() * 4, weight_decay=mlp.weight_decay)
    report = bilevel.check(
        mlp.inner, mlp.outer, mlp.w0, mlp.hparams(), dynamics, 3000, method, iterations=2000
    )
    assert report.passed(1e-5), str(report)
    assert abs(float(report.analytic[0])) < 1e-6  # lr does not change the minimiser


@pytest.mark.parametrize("method,options", UNROLLED)
def test_minibatch_objective_chosen_by_step_number(mlp, method, options):
    """inner(params, hparams, t): each step sees batch t mod 3, replays included."""
    batches = mlp.x.reshape(3, 8, 3), mlp.y.reshape(3, 8, 1)

    def inner(p, h, t):
        x, y = batches[0][t % 3], batches[1][t % 3]
        return ((mlp.predict(p, x) - y) ** 2).mean()

    steps = 30
    options = {"k": steps} if method == "truncated" else options
    report = bilevel.check(
        inner, mlp.outer, mlp.w0, mlp.hparams(), mlp.dynamics("momentum"), steps, method, **options
    )
    assert report.passed(1e-7), str(report)
