"""Stochastic bilevel solvers (bilevel.stochastic) on a quadratic whose value function is known:
the products against closed forms, convergence to the minimiser, unbiased directions,
variance reduction, exact resumption and one-line errors. All in float64, all seeded."""

import io
import math

import pytest
import torch

import bilevel
from bilevel import stochastic

SOLVER_NAMES = ["soba", "ma-soba", "saba", "amigo", "stocbio"]


@pytest.fixture(scope="module")
def problem():
    return stochastic.QuadraticProblem(
        n_inner=64, n_outer=32, dim_inner=5, dim_outer=3, mu_inner=0.2, smooth_inner=1.0
    )


def vector(seed, size):
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the problem: oracles and closed forms -------------------------------------------------


def test_the_products_are_the_closed_form_matrices_times_vectors(problem):
    x, z, v = vector(1, 3), vector(2, 5), vector(3, 5)
    batch = torch.tensor([3, 17, 40])
    a, b = problem.a[batch], problem.b[batch]
    A = a.T @ a / 3 + problem.mu_inner * torch.eye(5, dtype=torch.float64)
    B = a.T @ b / 3  # the mean of B_i = a_i b_i^T
    gradient, hessian_v, cross_v = problem.inner_products(x, z, v, batch)
    torch.testing.assert_close(gradient, A @ z - B @ x, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(hessian_v, A @ v, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(cross_v, -B.T @ v, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(problem.inner_gradient(x, z, batch), gradient, rtol=0, atol=0)
    outer_batch = torch.tensor([0, 31])
    c, y, e = problem.c[outer_batch], problem.y[outer_batch], problem.e[outer_batch]
    outer_x, outer_z = problem.outer_gradients(x, z, outer_batch)
    torch.testing.assert_close(outer_x, problem.mu_outer * x + e.mean(0), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(outer_z, c.T @ (c @ z - y) / 2, rtol=1e-13, atol=1e-14)


def test_the_value_function_its_gradient_and_minimiser_are_exact(problem):
    everything_in = torch.arange(problem.n_inner)
    everything_out = torch.arange(problem.n_outer)
    x = vector(4, 3)
    z_star = problem.inner_solution(x)
    assert problem.inner_gradient(x, z_star, everything_in).abs().max() < 1e-13
    # v* solves d2_zz G v + grad_z F = 0 (with the products of the objectives themselves)
    v_star = problem.linear_solution(x)
    _, hessian_v, _ = problem.inner_products(x, z_star, v_star, everything_in)
    _, outer_z = problem.outer_gradients(x, z_star, everything_out)
    assert (hessian_v + outer_z).abs().max() < 1e-13
    # h(x) = F(x, z*(x)) by the objective over all samples
    value = problem.outer_value(x, z_star, everything_out)
    torch.testing.assert_close(problem.value(x), value, rtol=1e-13, atol=0)
    # grad h by central differences of the closed form, and zero at the minimiser
    step = 1e-6
    numeric = torch.stack(
        [
            (problem.value(x + step * e) - problem.value(x - step * e)) / (2 * step)
            for e in torch.eye(3, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(problem.gradient(x), numeric, rtol=1e-8, atol=1e-9)
    assert problem.gradient(problem.minimiser).abs().max() < 1e-13
    assert problem.minimum == pytest.approx(float(problem.value(problem.minimiser)), abs=1e-15)
    # the conditioning stated: every A_i between mu_inner and smooth_inner
    a = problem.a
    assert torch.allclose((a**2).sum(1), torch.full((64,), 0.8, dtype=torch.float64))


# -- convergence ---------------------------------------------------------------------------

# SOBA's schedule: rho ~ k^-2/5, gamma ~ k^-3/5
DECREASING = {"inner_decay": 0.4, "outer_decay": 0.6}
CONVERGENCE = {
    # name: (settings, iterations, tolerance on ||x - x*|| / ||x*||); measured over solver
    # seeds 0-4: soba 0.3-0.7%, ma-soba 0.3-0.6%, saba < 2e-12, amigo 0.5-4.3%, stocbio 2.7-3.6%
    "soba": (DECREASING, 800, 0.02),
    "ma-soba": ({**DECREASING, "averaging": 0.3}, 800, 0.02),
    "saba": ({"outer_step": 0.5}, 400, 1e-8),  # constant steps: variance reduction, linear rate
    "amigo": ({**DECREASING, "inner_steps": 3, "linear_steps": 3}, 400, 0.06),
    "stocbio": (
        {**DECREASING, "inner_steps": 3, "neumann_steps": 10, "linear_step": 1.5},
        200,
        0.06,
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_every_solver_converges_to_the_minimiser_of_the_value_function(problem, name):
    settings, iterations, tolerance = CONVERGENCE[name]
    settings = {
        "inner_step": 0.8,
        "outer_step": 1.0,
        "inner_batch": 32,
        "outer_batch": 32,
        **settings,
    }
    solver = stochastic.make(name, problem, evaluate_every=iterations, **settings)
    (last,) = solver.run(iterations)
    error = torch.linalg.vector_norm(solver.x["x"] - problem.minimiser)
    assert float(error / torch.linalg.vector_norm(problem.minimiser)) < tolerance
    assert last["distance"] == pytest.approx(float(error), rel=1e-12)
    assert last["suboptimality"] >= 0 and last["iteration"] == iterations


@pytest.mark.e2e
def test_saba_beats_soba_at_equal_samples(problem):
    """The variance-reduced SABA against SOBA with the same steps and batches, and against SOBA
    with its decreasing steps, after the same number of samples (SABA's count includes its
    first pass over the data): SABA's suboptimality is far lower (measured: 6e-17 against
    1.6e-3 and 1.8e-3 at 6400 samples)."""
    common = {"inner_step": 0.8, "outer_step": 0.5, "inner_batch": 8, "outer_batch": 8}
    budget = 6400
    saba = stochastic.make("saba", problem, evaluate_every=10**6, **common)
    while saba.samples["inner"] + saba.samples["outer"] < budget:
        saba.step()
    samples = saba.samples["inner"] + saba.samples["outer"]
    saba_gap = saba.evaluate()["suboptimality"]
    for extra in ({}, DECREASING):
        soba = stochastic.make("soba", problem, evaluate_every=10**6, **common, **extra)
        soba.run(samples // 16)
        assert soba.samples["inner"] + soba.samples["outer"] == samples
        assert saba_gap < 1e-6 * soba.evaluate()["suboptimality"]


# -- unbiased directions -------------------------------------------------------------------


def rates(settings, iteration):
    """(inner, linear, outer) step sizes at `iteration`, as the solvers' schedule states."""
    inner_scale = iteration ** -settings["inner_decay"]
    return (
        settings["inner_step"] * inner_scale,
        settings["linear_step"] * inner_scale,
        settings["outer_step"] * iteration ** -settings["outer_decay"],
    )


def expected_directions(problem, name, settings, steps, x, z, v):
    """The mean of each solver's directions at (x, z, v) with step sizes `steps`, by its
    recursions with the full-batch matrices: every step is affine in the iterates with a
    minibatch drawn independently of them, so expectations follow the deterministic
    recursion exactly."""
    A, B, C = problem.A_mean, problem.B_mean, problem.C_mean
    rho, beta, _ = steps
    for _ in range(settings.get("inner_steps", 0)):  # AmIGO's and StocBiO's inner SGD
        z = z - rho * (A @ z - B @ x)
    b = C @ z - problem.r
    if name == "amigo":
        for _ in range(settings["linear_steps"]):
            v = v - beta * (A @ v + b)
    if name == "stocbio":
        eta = settings["linear_step"]  # the series' parameter: not decayed
        term, total = b, b
        for _ in range(settings["neumann_steps"]):
            term = term - eta * A @ term
            total = total + term
        v = -eta * total
    return {
        "z": A @ z - B @ x,
        "v": A @ v + b,
        "x": problem.mu_outer * x + problem.e_mean - B.T @ v,
    }


def drawn_directions(solver, state, draws):
    """Each draw: the solver restored to `state`, its sampler seeded anew, one step; the
    directions it moved along, read from the iterates (x from the moving average for
    MA-SOBA). Returns ({name: (draws, size) tensor}, the step sizes used)."""
    inner, linear, outer = steps = rates(solver.settings, state["iteration"] + 1)
    found = {"z": [], "v": [], "x": []}
    for seed in range(draws):
        solver.load_state_dict(state)
        solver.sampler.generator.manual_seed(seed)
        solver.step()
        found["z"].append((state["z"] - solver.z["z"]) / inner)
        found["v"].append((state["v"] - solver.v["z"]) / linear)
        if solver.name == "ma-soba":
            theta = solver.settings["averaging"]
            before = state["memory"]["average"]
            found["x"].append((solver.average["x"] - (1 - theta) * before) / theta)
            # x moved along the average from before the draw
            torch.testing.assert_close(solver.x["x"], state["x"] - outer * before)
        else:
            found["x"].append((state["x"] - solver.x["x"]) / outer)
    return {k: torch.stack(v) for k, v in found.items()}, steps


def assert_mean(draws, expected):
    """The sample mean within 4.5 standard errors of `expected`, coordinate by coordinate."""
    mean = draws.mean(0)
    error = draws.std(0) / math.sqrt(len(draws))
    assert bool(((mean - expected).abs() <= 4.5 * error + 1e-12).all()), (mean, expected, error)


DIRECTION_SETTINGS = {
    "soba": {"linear_step": 0.4},
    "ma-soba": {"averaging": 0.5, "linear_step": 0.3},
    "saba": {"inner_batch": 12, "outer_batch": 7},  # blocks of unequal sizes: 5 x 12 + 4, 4 x 7 + 4
    "amigo": {"inner_steps": 2, "linear_steps": 2, "linear_step": 0.4},
    "stocbio": {"inner_steps": 1, "neumann_steps": 4, "linear_step": 1.5, "hessian_batch": 32},
}


def solver_at(problem, name, x, z, v, draws_before=0, **settings):
    """A solver and a state of it at (x, z, v), after `draws_before` steps (stale memories)."""
    settings = {
        "inner_step": 0.5,
        "outer_step": 0.3,
        "inner_batch": 16,
        "outer_batch": 8,
        **settings,
    }
    solver = stochastic.make(name, problem, evaluate_every=10**6, **settings)
    if draws_before:
        solver.run(draws_before)
    state = solver.state_dict()
    state.update(x=x.clone(), z=z.clone(), v=v.clone())
    if name == "ma-soba":
        state["memory"]["average"] = vector(9, 3)
    return solver, state


@pytest.mark.e2e
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_the_direction_at_the_solution_is_the_hypergradient_in_expectation(problem, name):
    """At (x, z*(x), v*(x)) with x away from x*, every solver's x-direction averages to grad h(x)
    (StocBiO's to its truncated Neumann series, within (1 - eta mu)^(Q+1) of grad h)."""
    settings = DIRECTION_SETTINGS[name]
    x = problem.minimiser + 4 * vector(5, 3)
    z, v = problem.inner_solution(x), problem.linear_solution(x)
    solver, state = solver_at(problem, name, x, z, v, draws_before=3, **settings)
    draws, steps = drawn_directions(solver, state, 400)
    exact = problem.gradient(x)
    expected = expected_directions(problem, name, solver.settings, steps, x, z, v)["x"]
    if name == "stocbio":
        bias = torch.linalg.vector_norm(expected - exact) / torch.linalg.vector_norm(exact)
        assert 0 < bias < (1 - 1.5 * problem.mu_inner) ** 5  # eta = 1.5, Q = 4
    else:
        torch.testing.assert_close(expected, exact, rtol=1e-12, atol=1e-13)
    assert_mean(draws["x"], expected)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_with_full_batches_a_step_is_the_expected_recursion_exactly(problem, name):
    """With every batch the whole data, a step is deterministic: its directions are the
    full-batch recursions of expected_directions to rounding (the algebra, term by term)."""
    x, z, v = vector(6, 3), vector(7, 5), vector(8, 5)
    full = {"inner_batch": problem.n_inner, "outer_batch": problem.n_outer, **DECREASING}
    if name == "stocbio":
        full["hessian_batch"] = problem.n_inner
    solver, state = solver_at(problem, name, x, z, v, **{**DIRECTION_SETTINGS[name], **full})
    state["iteration"] = 3  # the fourth step: the decreasing steps have decreased
    draws, steps = drawn_directions(solver, state, 2)
    assert steps[0] == 0.5 * 4**-0.4 and steps[2] == 0.3 * 4**-0.6
    expected = expected_directions(problem, name, solver.settings, steps, x, z, v)
    keys = ["x"] if name in ("amigo", "stocbio") else ["z", "v", "x"]
    for key in keys:
        for drawn in draws[key]:
            torch.testing.assert_close(drawn, expected[key], rtol=1e-11, atol=1e-12)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["soba", "ma-soba", "saba"])
def test_single_loop_directions_anywhere_are_the_full_batch_ones_in_expectation(problem, name):
    """At an arbitrary (x, z, v), the three directions average to the full-batch D_z, D_v, D_x,
    SABA's too with a memory stored at other points (drawn over a few earlier steps)."""
    x, z, v = vector(6, 3), vector(7, 5), vector(8, 5)
    solver, state = solver_at(problem, name, x, z, v, draws_before=5, **DIRECTION_SETTINGS[name])
    draws, steps = drawn_directions(solver, state, 400)
    expected = expected_directions(problem, name, solver.settings, steps, x, z, v)
    for key in ("z", "v", "x"):
        assert_mean(draws[key], expected[key])


# -- resumption ----------------------------------------------------------------------------

RESUME_SETTINGS = {
    "soba": {},
    "ma-soba": {"averaging": 0.3, "radius": 5.0},
    "saba": {"inner_batch": 5},  # 64 = 12 blocks of 5 and one of 4: unequal weights
    "amigo": {"inner_steps": 2, "linear_steps": 2},
    "stocbio": {"inner_steps": 2, "neumann_steps": 3},
}


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_a_killed_run_continues_with_the_same_numbers(problem, name):
    settings = {
        "inner_step": 0.5,
        "outer_step": 0.3,
        "inner_batch": 4,
        "outer_batch": 3,
        "inner_decay": 0.4,
        "evaluate_every": 5,
        **RESUME_SETTINGS[name],
    }
    uninterrupted = stochastic.make(name, problem, seed=3, **settings)
    uninterrupted.run(10)
    checkpoint = io.BytesIO()
    torch.save(uninterrupted.state_dict(), checkpoint)
    expected = []
    for _ in range(20):
        uninterrupted.step()
        expected.append((uninterrupted.x, uninterrupted.z, uninterrupted.v))

    checkpoint.seek(0)
    resumed = stochastic.make(name, problem, seed=99, **settings)  # the state's draws win
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    for x, z, v in expected:
        resumed.step()
        assert torch.equal(resumed.x["x"], x["x"])
        assert torch.equal(resumed.z["z"], z["z"])
        assert torch.equal(resumed.v["z"], v["z"])

    def numbers(history):
        return [{k: m for k, m in e.items() if k != "seconds"} for e in history]

    assert numbers(resumed.history) == numbers(uninterrupted.history)
    assert [e["iteration"] for e in resumed.history] == [5, 10, 15, 20, 25, 30]
    assert resumed.samples == uninterrupted.samples


def test_evaluations_go_to_history_and_callbacks(problem):
    seen = []
    solver = stochastic.SOBA(
        problem, inner_step=0.5, outer_step=0.3, evaluate_every=4, callbacks=[seen.append]
    )
    evaluations = solver.run(10)
    assert [m["iteration"] for m in seen] == [4, 8] and evaluations == seen == solver.history
    expected = {"samples", "seconds", "outer_value", "inner_gradient_norm", "suboptimality"}
    assert expected | {"hypergradient_norm_sq", "value", "inner_error"} <= set(seen[0])
    assert seen[1]["samples"] == 16 and seen[1]["inner_samples"] == 8


# -- errors: one clear line each -----------------------------------------------------------


def one_line(error):
    message = str(error.value)
    assert "\n" not in message
    return message


GOOD = {"inner_step": 0.5, "outer_step": 0.1}


@pytest.mark.parametrize(
    "name, settings, error, words",
    [
        (
            "soba",
            {"inner_step": -0.1},
            ValueError,
            "soba: inner_step must be a number > 0, got -0.1",
        ),
        ("saba", {"outer_step": float("nan")}, ValueError, "saba: outer_step must be a number > 0"),
        (
            "amigo",
            {"inner_batch": 65},
            ValueError,
            "amigo: inner_batch=65 is larger than the data (n_inner=64)",
        ),
        (
            "soba",
            {"outer_batch": 33},
            ValueError,
            "outer_batch=33 is larger than the data (n_outer=32)",
        ),
        (
            "soba",
            {"inner_batch": 0},
            ValueError,
            "soba: inner_batch must be an integer >= 1, got 0",
        ),
        (
            "stocbio",
            {"hessian_batch": 100},
            ValueError,
            "hessian_batch=100 is larger than the data",
        ),
        ("stocbio", {"neumann_steps": -1}, ValueError, "neumann_steps must be an integer >= 0"),
        ("ma-soba", {"averaging": 1.5}, ValueError, "averaging must be a number in (0, 1]"),
        ("ma-soba", {"radius": 0}, ValueError, "radius must be a number > 0"),
        ("saba", {"memory": "half"}, ValueError, "memory must be 'full' or 'zero', got 'half'"),
        ("soba", {"inner_decay": -1}, ValueError, "inner_decay must be a number >= 0"),
        ("soba", {"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
        (
            "sobaa",
            {},
            ValueError,
            "unknown stochastic solver 'sobaa'; choose one of soba, ma-soba, saba, amigo, stocbio",
        ),
        (
            "soba",
            {"averaging": 0.1},
            TypeError,
            "unknown setting 'averaging' for solver 'soba'; it accepts: inner_step",
        ),
    ],
)
def test_bad_settings_are_one_clear_line(problem, name, settings, error, words):
    with pytest.raises(error) as caught:
        stochastic.make(name, problem, **{**GOOD, **settings})
    assert words in one_line(caught)


def test_a_missing_step_is_named(problem):
    with pytest.raises(TypeError) as caught:
        stochastic.make("amigo", problem, inner_step=0.1)
    assert one_line(caught) == "solver 'amigo' needs outer_step=..."


def test_bad_problems_are_one_clear_line():
    x, z = {"x": torch.zeros(2)}, {"z": torch.zeros(3)}
    data = torch.randn(10, 3)

    def inner(x, z, batch):
        return 0.5 * ((data[batch] @ z["z"]) ** 2).mean() + (z["z"] ** 2).sum()

    def outer(x, z, batch):
        return (data[batch] @ z["z"]).mean() + (x["x"] ** 2).sum()

    with pytest.raises(ValueError) as caught:  # more samples than the data has
        stochastic.StochasticProblem(inner, outer, x, z, 11, 10)
    assert "inner(x, z, batch) failed on batch [0, 10] (is n_inner=11" in one_line(caught)
    with pytest.raises(TypeError) as caught:
        stochastic.StochasticProblem(lambda x, z, b: z["z"], outer, x, z, 10, 10)
    assert "must return a floating-point scalar tensor" in one_line(caught)
    with pytest.raises(ValueError) as caught:
        stochastic.StochasticProblem(lambda x, z, b: (x["x"] ** 2).sum(), outer, x, z, 10, 10)
    assert one_line(caught) == "inner(x, z, batch) does not depend on z: nothing to minimise"
    with pytest.raises(TypeError) as caught:
        stochastic.StochasticProblem(
            inner, outer, x, {"z": torch.zeros(3, dtype=torch.float64)}, 10, 10
        )
    assert "z['z'] is torch.float64" in one_line(caught)
    with pytest.raises(ValueError) as caught:
        stochastic.StochasticProblem(inner, outer, x, z, 0, 10)
    assert one_line(caught) == "n_inner must be an integer >= 1, got 0"
    with pytest.raises(TypeError) as caught:
        stochastic.SOBA("problem", **GOOD)
    assert "soba: problem must be a bilevel.stochastic.StochasticProblem" in one_line(caught)


def test_a_state_of_another_solver_or_other_settings_is_refused(problem):
    soba = stochastic.SOBA(problem, **GOOD)
    soba.run(2)
    with pytest.raises(ValueError) as caught:
        stochastic.SABA(problem, **GOOD).load_state_dict(soba.state_dict())
    assert one_line(caught) == "saba: state was saved by solver 'soba'"
    with pytest.raises(ValueError) as caught:
        stochastic.SOBA(problem, inner_step=0.4, outer_step=0.1).load_state_dict(soba.state_dict())
    assert "soba: state has other settings: inner_step=0.5 there, 0.4 here" in one_line(caught)


def test_divergence_is_reported_with_the_iteration_and_the_steps(problem):
    solver = stochastic.SOBA(problem, inner_step=50.0, outer_step=50.0, evaluate_every=10**6)
    with pytest.raises(stochastic.DivergenceError) as caught:
        solver.run(300)  # overflows after about 200 iterations; checked at the run's end
    message = one_line(caught)
    assert message.startswith("soba: ") and "is NaN or infinite after iteration 300" in message
    assert message.endswith("(inner_step=50.0, linear_step=50.0, outer_step=50.0)")


def test_the_subpackage_is_part_of_the_public_api():
    assert bilevel.stochastic is stochastic and "stochastic" in bilevel.__all__
    assert set(SOLVER_NAMES) <= set(stochastic.SOLVERS)  # other solvers are tested elsewhere
