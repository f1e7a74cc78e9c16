"""Bad input gets a clear error that names the problem."""

import pytest
import torch

import bilevel

from .problems import DTYPE, Ridge


@pytest.fixture()
def ridge():
    return Ridge()


def call(ridge, **changes):
    arguments = dict(
        inner=ridge.inner,
        outer=ridge.outer,
        params=ridge.params(),
        hparams=ridge.hparams(),
        dynamics=bilevel.sgd(lr=0.1),
        steps=5,
    )
    arguments.update(changes)
    return bilevel.hypergradient(**arguments)


def test_unknown_method(ridge):
    with pytest.raises(ValueError, match="unknown method 'backprop'; choose one of reverse"):
        call(ridge, method="backprop")


def test_unknown_option_lists_the_valid_ones(ridge):
    with pytest.raises(
        TypeError,
        match="unknown option 'k' for method 'reverse'; it accepts: "
        "memory, checkpoint_every, window",
    ):
        call(ridge, method="reverse", k=3)


def test_missing_required_option(ridge):
    with pytest.raises(TypeError, match="method 'truncated' needs the option k="):
        call(ridge, method="truncated")


@pytest.mark.parametrize(
    "options,message",
    [
        ({"method": "reverse", "memory": "disk"}, "memory must be one of"),
        (
            {"method": "reverse", "memory": "checkpoint", "checkpoint_every": 0},
            "checkpoint_every must",
        ),
        ({"method": "truncated", "k": 0}, "k must be an integer >= 1"),
        ({"method": "truncated", "k": 6}, "at most steps=5"),
        ({"method": "implicit-cg", "iterations": 0}, "iterations must be an integer >= 1"),
        ({"method": "implicit-neumann", "alpha": -1.0}, "alpha must be a number > 0"),
        ({"method": "fixed-point", "tolerance": -1.0}, "tolerance must be a number >= 0"),
    ],
)
def test_bad_option_values(ridge, options, message):
    with pytest.raises(ValueError, match=message):
        call(ridge, **options)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(ridge, steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        call(ridge, steps=steps)


def test_steps_not_an_integer(ridge):
    with pytest.raises(TypeError, match="steps must be an integer"):
        call(ridge, steps=2.5)


def test_hyperparameter_that_does_not_require_grad(ridge):
    with pytest.raises(ValueError, match=r"hparams\['gamma'\] does not require grad"):
        call(ridge, hparams={"gamma": ridge.gamma.detach()})


def test_non_scalar_inner_objective(ridge):
    with pytest.raises(
        ValueError,
        match="inner objective must return a scalar, got a tensor "
        r"of shape \(40,\)",
    ):
        call(ridge, inner=lambda p, h: (ridge.X @ p["w"] - ridge.y) ** 2)


@pytest.mark.parametrize("method", ["reverse", "forward", "implicit-cg"])
def test_non_scalar_outer_objective(ridge, method):
    with pytest.raises(ValueError, match="outer objective must return a scalar"):
        call(ridge, outer=lambda p, h: p["w"], method=method)


def test_objective_that_is_not_callable(ridge):
    with pytest.raises(TypeError, match="outer must be a callable"):
        call(ridge, outer=3.0)


def test_params_not_a_dict(ridge):
    with pytest.raises(TypeError, match="params must be a dict of str -> Tensor, got Tensor"):
        call(ridge, params=torch.zeros(6, dtype=DTYPE))


def test_integer_tensor(ridge):
    with pytest.raises(TypeError, match=r"params\['w'\] must be a floating-point tensor"):
        call(ridge, params={"w": torch.zeros(6, dtype=torch.long)})


def test_mixed_dtypes_are_named(ridge):
    with pytest.raises(
        TypeError,
        match=r"hparams\['gamma'\] is torch.float32 .* but 'w' is "
        "torch.float64",
    ):
        call(ridge, hparams={"gamma": ridge.gamma.detach().float().requires_grad_()})


def test_shape_mismatch_between_params_and_the_problem(ridge):
    with pytest.raises(RuntimeError, match="size mismatch|shape|must match"):
        call(ridge, params={"w": torch.zeros(5, dtype=DTYPE)})


def test_learned_initialisation_with_wrong_keys(ridge):
    with pytest.raises(
        KeyError,
        match="inner objective asked for 'w', which is neither in params "
        r"\['v'\] nor in hparams \['gamma'\]",
    ):
        call(ridge, params=lambda h: {"v": torch.zeros(6, dtype=DTYPE)}, method="reverse")


def test_dynamics_of_the_wrong_type(ridge):
    with pytest.raises(TypeError, match="dynamics must be a bilevel.Dynamics"):
        call(ridge, dynamics=torch.optim.SGD)


@pytest.mark.parametrize("method", ["reverse", "forward", "implicit-cg", "truncated"])
def test_diverging_inner_run_says_where_and_what_to_do(ridge, method):
    options = {"k": 3} if method == "truncated" else {}
    with pytest.raises(
        bilevel.InnerDivergenceError,
        match=r"became (inf|nan) at step \d+.*smaller inner learning rate",
    ):
        call(ridge, dynamics=bilevel.sgd(lr=50.0), steps=400, method=method, **options)


def test_non_finite_hypergradient_is_reported(ridge):
    def outer(p, h):  # finite value, infinite derivative in gamma at the outer's sqrt(0)
        return (p["w"] ** 2).sum() + (h["gamma"] * 0).sum().sqrt()

    with pytest.raises(bilevel.HypergradientError, match="hypergradient of 'gamma' is NaN"):
        call(ridge, outer=outer)


def test_non_finite_gradient_of_the_outer_objective_in_w_is_named(ridge):
    def outer(p, h):  # finite value, infinite derivative in w at the outer's sqrt(0)
        return (p["w"] * 0).sum().sqrt() + h["gamma"].sum() * 0

    with pytest.raises(bilevel.HypergradientError, match=r"outer objective .*params\['w'\]"):
        call(ridge, outer=outer)


@pytest.mark.parametrize("method", ["implicit-cg", "implicit-neumann", "fixed-point"])
def test_unconverged_implicit_solve_warns(ridge, method):
    with pytest.warns(bilevel.SolverWarning, match="stopped after 1 iterations"):
        result = call(ridge, method=method, iterations=1, steps=50)
    assert result.info["converged"] is False and result.info["iterations"] == 1


def test_params_that_require_grad_are_refused_by_hypergradient(ridge):
    w0 = torch.zeros(6, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\['w'\] requires grad.*params=lambda h"):
        call(ridge, params={"w": w0})


def test_a_reverse_solution_is_pulled_back_once(ridge):
    from bilevel.hypergrad.problem import InnerProblem, with_step
    from bilevel.hypergrad.reverse import reverse

    problem = InnerProblem(with_step(ridge.inner), bilevel.sgd(lr=0.1), ("w",))
    lam = {"gamma": ridge.gamma.detach().requires_grad_(True)}
    solution = reverse(problem, ridge.params(), lam, 5)
    solution.vjp({"w": torch.ones(6, dtype=DTYPE)})
    with pytest.raises(RuntimeError, match="pulled back once"):
        solution.vjp({"w": torch.ones(6, dtype=DTYPE)})


def test_setting_that_broadcasts_to_another_shape_is_named(ridge):
    lr = torch.full((6, 1), 0.1, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"changed the shape of 'w' from \(6,\) to \(6, 6\)"):
        call(ridge, dynamics=bilevel.sgd(lr=lambda h: lr))


def test_setting_that_reads_a_missing_hyperparameter_is_named(ridge):
    with pytest.raises(KeyError, match="lr setting asked for hyperparameter 'log_lr'"):
        call(ridge, dynamics=bilevel.sgd(lr=lambda h: h["log_lr"].exp()))


def test_per_group_setting_with_a_key_that_is_not_a_parameter(ridge):
    with pytest.raises(KeyError, match=r"per-group weight_decay setting has keys \['W'\]"):
        call(ridge, dynamics=bilevel.sgd(lr=0.1, weight_decay=lambda h: {"w": 0.1, "W": 0.2}))


def test_objectives_without_a_graph_are_explained(ridge):
    with pytest.raises(ValueError, match="outer objective depends neither on params"):
        call(ridge, outer=lambda p, h: torch.tensor(1.0, dtype=DTYPE))
    with pytest.raises(ValueError, match="inner objective does not depend on params"):
        call(ridge, inner=lambda p, h: ridge.inner(p, h).detach())


def test_inference_mode_is_explained(ridge):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="use torch.no_grad"):
        bilevel.solve(ridge.inner, ridge.params(), ridge.hparams(), bilevel.sgd(lr=0.1), 3)


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"method": "reverse", "checkpoint_every": 3}, ValueError, "applies to memory='check"),
        ({"method": "forward", "vectorize": "no"}, TypeError, "vectorize must be True or False"),
        (
            {"method": "implicit-neumann", "dynamics": bilevel.adam(lr=0.1)},
            ValueError,
            "needs alpha=... with adam",
        ),
    ],
)
def test_option_misuse_is_named(ridge, options, error, message):
    with pytest.raises(error, match=message):
        call(ridge, **options)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: bilevel.adam(lr=0.1, betas=(0.9, 1.0)), r"betas\[1\] must be < 1.0"),
        (lambda: bilevel.adam(lr=0.1, betas=0.9), "betas must be a pair"),
        (lambda: bilevel.sgd(lr=0.1, momentum=1.5), "momentum must be < 1.0"),
    ],
)
def test_settings_out_of_range(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_integer_steps_are_accepted(ridge):
    import numpy as np

    assert call(ridge, steps=np.int64(3)).value > 0
