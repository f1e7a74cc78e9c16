"""The outer loop: torch.optim over hyperparameters, constraints, callbacks, real time."""

import pytest
import torch

import bilevel
from bilevel.constraints import Box, L1Ball

from .problems import DTYPE, Ridge


@pytest.mark.e2e
def test_hyper_optimizer_descends_the_outer_objective_towards_the_exact_optimum():
    ridge = Ridge()
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    seen = []
    loop = bilevel.HyperOptimizer(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        {"gamma": gamma},
        bilevel.sgd(lr=0.3),
        200,
        torch.optim.Adam([gamma], lr=0.05),
        method="implicit-cg",
        callbacks=[seen.append],
    )
    history = loop.run(60)
    assert [m["iteration"] for m in seen] == list(range(1, 61))
    assert history[-1]["outer_loss"] < 0.9 * history[0]["outer_loss"]
    assert {"outer_loss", "hypergradient_norm", "seconds", "iterations"} <= set(history[0])


def test_constraints_are_applied_after_every_step():
    ridge = Ridge()
    gamma = torch.full((6,), 0.5, dtype=DTYPE, requires_grad=True)
    constraint = L1Ball(2.0, bound=1.0, nonnegative=True)

    def check(metrics):
        assert float(gamma.detach().min()) >= 0 and float(gamma.detach().max()) <= 1 + 1e-12
        assert float(gamma.detach().sum()) <= 2.0 + 1e-9

    loop = bilevel.HyperOptimizer(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        {"gamma": gamma},
        bilevel.sgd(lr=0.3),
        20,
        torch.optim.SGD([gamma], lr=5.0),
        constraints={"gamma": constraint},
        callbacks=[check],
    )
    assert float(gamma.detach().sum()) <= 2.0 + 1e-9  # projected at the start already
    loop.run(5)


def test_warm_start_continues_from_the_last_inner_solution():
    ridge = Ridge()
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    loop = bilevel.HyperOptimizer(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        {"gamma": gamma},
        bilevel.sgd(lr=0.3),
        10,
        torch.optim.SGD([gamma], lr=0.0),
        warm_start=True,
    )
    loop.run(3)  # lr 0: the same problem, so three warm-started runs = one run of 30 steps
    long = bilevel.hypergradient(
        ridge.inner, ridge.outer, ridge.params(), {"gamma": gamma}, bilevel.sgd(lr=0.3), 30
    )
    assert torch.allclose(loop.last.params["w"], long.params["w"], rtol=1e-12, atol=0)


def test_real_time_forward_mode_updates_within_one_run():
    ridge = Ridge()
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    loop = bilevel.RealTimeHyperOptimizer(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        {"gamma": gamma},
        bilevel.sgd(lr=0.3),
        10,
        torch.optim.SGD([gamma], lr=0.0),
    )
    first = loop.step()
    # with the hyperparameters unchanged, after 10 steps it is exactly the forward-mode gradient
    reference = bilevel.hypergradient(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        {"gamma": gamma},
        bilevel.sgd(lr=0.3),
        10,
        "forward",
    )
    assert torch.allclose(gamma.grad, reference.grads["gamma"], rtol=1e-12, atol=0)
    assert first["inner_step"] == 10 and loop.step()["inner_step"] == 20
    loop.optimizer.param_groups[0]["lr"] = 1.0
    history = loop.run(30)
    assert history[-1]["outer_loss"] < first["outer_loss"]


def test_outer_loop_input_errors():
    ridge = Ridge()
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    args = (ridge.inner, ridge.outer, ridge.params(), {"gamma": gamma}, bilevel.sgd(lr=0.3), 5)
    with pytest.raises(ValueError, match=r"optimizer does not hold hparams \['gamma'\]"):
        bilevel.HyperOptimizer(*args, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        bilevel.HyperOptimizer(*args, "adam")
    with pytest.raises(KeyError, match="lam"):
        bilevel.HyperOptimizer(
            *args, torch.optim.SGD([gamma], lr=1), constraints={"lam": Box(0, 1)}
        )
    with pytest.raises(ValueError, match="not a leaf"):
        bilevel.HyperOptimizer(
            ridge.inner,
            ridge.outer,
            ridge.params(),
            {"gamma": gamma * 1},
            bilevel.sgd(lr=0.3),
            5,
            torch.optim.SGD([gamma], lr=1),
        )
    with pytest.raises(ValueError, match="warm_start=True needs params as a dict"):
        bilevel.HyperOptimizer(
            ridge.inner,
            ridge.outer,
            lambda h: ridge.params(),
            {"gamma": gamma},
            bilevel.sgd(lr=0.3),
            5,
            torch.optim.SGD([gamma], lr=1),
            warm_start=True,
        )


def _ridge_loop(ridge, warm_start=False, method="reverse"):
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    return bilevel.HyperOptimizer(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        {"gamma": gamma},
        bilevel.sgd(lr=0.3),
        15,
        torch.optim.Adam([gamma], lr=0.05),
        method=method,
        warm_start=warm_start,
        constraints={"gamma": Box(0.0, 10.0)},
    )


def _without_time(history):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in history]


@pytest.mark.parametrize("warm_start", [False, True])
def test_a_loop_restored_from_its_state_dict_continues_with_the_same_numbers(warm_start, tmp_path):
    ridge = Ridge()
    whole = _ridge_loop(ridge, warm_start)
    whole.run(6)
    first = _ridge_loop(ridge, warm_start)
    first.run(3)
    state = first.state_dict()
    first.run(2)  # later steps do not change the state taken before them
    for restored in (state, torch.load(_saved(state, tmp_path), weights_only=True)):
        resumed = _ridge_loop(ridge, warm_start)
        resumed.load_state_dict(restored)
        resumed.run(3)
        assert _without_time(resumed.history) == _without_time(whole.history)
        assert torch.equal(resumed.hparams["gamma"], whole.hparams["gamma"])


def _saved(state, directory):
    torch.save(state, directory / "loop.pt")
    return directory / "loop.pt"


def test_a_real_time_loop_restored_from_its_state_dict_continues_with_the_same_numbers():
    ridge = Ridge()

    def loop():
        gamma = ridge.gamma.detach().clone().requires_grad_(True)
        return bilevel.RealTimeHyperOptimizer(
            ridge.inner,
            ridge.outer,
            ridge.params(),
            {"gamma": gamma},
            bilevel.sgd(lr=0.3, momentum=0.5),
            4,
            torch.optim.Adam([gamma], lr=0.05),
        )

    whole, first = loop(), loop()
    whole.run(5)
    first.run(2)
    state = first.state_dict()
    resumed = loop()
    resumed.load_state_dict(state)
    resumed.run(3)
    assert _without_time(resumed.history) == _without_time(whole.history)
    assert resumed.solver.t == whole.solver.t == 20
    assert all(torch.equal(a, b) for a, b in zip(resumed.solver.z, whole.solver.z))


def test_loading_a_state_of_another_loop_is_a_clear_error():
    ridge = Ridge()
    state = _ridge_loop(ridge).state_dict()
    with pytest.raises(ValueError, match="missing"):
        _ridge_loop(ridge).load_state_dict({"hparams": {}})
    other = dict(state, hparams={"beta": state["hparams"]["gamma"]})
    with pytest.raises(ValueError, match=r"its hparams \['beta'\]"):
        _ridge_loop(ridge).load_state_dict(other)
    short = dict(state, hparams={"gamma": state["hparams"]["gamma"][:2]})
    with pytest.raises(ValueError, match="shape"):
        _ridge_loop(ridge).load_state_dict(short)
    with pytest.raises(ValueError, match="warm-start"):
        _ridge_loop(ridge, warm_start=True).load_state_dict(state)
