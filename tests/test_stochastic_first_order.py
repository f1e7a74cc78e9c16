"""The first-order stochastic solvers (F2SA, BOME, PZOBO) and the engine's references (unrolled,
implicit) on the quadratic whose z*(x), h and grad h are known in closed form: each direction
against its closed form, convergence to the minimiser, exact resumption, samples counted as
documented, one-line errors. All in float64, all seeded."""

import math

import pytest
import torch

import bilevel
from bilevel import stochastic
from tests.test_stochastic import RESUME_SETTINGS, vector
from tests.test_stochastic import (
    test_a_killed_run_continues_with_the_same_numbers as resumes_exactly,
)

NAMES = ["f2sa", "bome", "pzobo", "unrolled", "implicit"]


@pytest.fixture(scope="module")
def problem():
    return stochastic.QuadraticProblem(
        n_inner=64, n_outer=32, dim_inner=5, dim_outer=3, mu_inner=0.2, smooth_inner=1.0
    )


FULL = {"inner_batch": 64, "outer_batch": 32}


def at(problem, name, x, z, v=None, memory=None, **settings):
    """A solver whose state is (x, z[, v, memory]), and that state."""
    solver = stochastic.make(name, problem, evaluate_every=10**6, **settings)
    state = solver.state_dict()
    state.update(x=x.clone(), z=z.clone())
    if v is not None:
        state["v"] = v.clone()
    state["memory"].update(memory or {})
    solver.load_state_dict(state)
    return solver, state


def direction(solver, state):
    """One step from `state`: the direction x moved along (over the step size used)."""
    solver.step()
    outer_rate = solver.settings["outer_step"] * solver.iteration ** -solver.settings["outer_decay"]
    return (state["x"] - solver.x["x"]) / outer_rate


def closed_forms(problem, x, z):
    """(grad_x F, grad_z F) at (x, z), and the full-batch A, B (grad_z G = A z - B x)."""
    A, B, C = problem.A_mean, problem.B_mean, problem.C_mean
    return problem.mu_outer * x + problem.e_mean, C @ z - problem.r, A, B


def truncated_run(problem, x, z, rho, steps):
    """z_T and dz_T/dx of `steps` full-batch gradient steps from z (held constant)."""
    A = problem.A_mean
    contraction = torch.linalg.matrix_power(torch.eye(5, dtype=torch.float64) - rho * A, steps)
    jacobian = (torch.eye(5, dtype=torch.float64) - contraction) @ problem.M
    return contraction @ z + jacobian @ x, jacobian


# -- the new primitives ---------------------------------------------------------------------


def test_inner_gradients_are_the_closed_form_in_x_and_z(problem):
    x, z = vector(1, 3), vector(2, 5)
    batch = torch.tensor([3, 17, 40])
    a, b = problem.a[batch], problem.b[batch]
    A = a.T @ a / 3 + problem.mu_inner * torch.eye(5, dtype=torch.float64)
    B = a.T @ b / 3
    gradient_x, gradient_z = problem.inner_gradients(x, z, batch)
    torch.testing.assert_close(gradient_x, -B.T @ z, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gradient_z, A @ z - B @ x, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gradient_z, problem.inner_gradient(x, z, batch), rtol=0, atol=0)


def test_gaussian_draws_are_seeded_and_resumable():
    sampler = stochastic.Sampler(5)
    state = sampler.state_dict()
    first = sampler.gaussian(4, 3, torch.float64)
    assert first.shape == (4, 3) and first.dtype == torch.float64
    sampler.load_state_dict(state)
    assert torch.equal(sampler.gaussian(4, 3, torch.float64), first)
    assert not torch.equal(sampler.gaussian(4, 3, torch.float64), first)


# -- the engine's references: exact hypergradients ------------------------------------------

REFERENCE = {"inner_step": 2.5, "outer_step": 1.0, **FULL}  # A's eigenvalues: 0.30 .. 0.43


@pytest.mark.parametrize("name", ["unrolled", "implicit"])
def test_references_give_grad_h_where_the_inner_problem_is_solved(problem, name):
    """From z = z*(x), full batches: the direction is grad h(x) to rounding (unrolled: up to
    ||(I - rho A)^T|| <= 0.25^15 = 1e-9 of its implicit part)."""
    x = problem.minimiser + 4 * vector(5, 3)
    solver, state = at(problem, name, x, problem.inner_solution(x), inner_steps=15, **REFERENCE)
    exact = problem.gradient(x)
    torch.testing.assert_close(direction(solver, state), exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(solver.z["z"], problem.inner_solution(x), rtol=1e-12, atol=1e-13)


def test_unrolled_is_the_gradient_of_the_truncated_problem_anywhere(problem):
    """From any z, T = 3: the direction is grad_x F + (dz_T/dx)^T grad_z F at z_T, with
    dz_T/dx = (I - (I - rho A)^T) dz*/dx (z_0 held constant: the warm start)."""
    x, z = vector(6, 3), vector(7, 5)
    solver, state = at(problem, "unrolled", x, z, inner_steps=3, **REFERENCE)
    z_T, jacobian = truncated_run(problem, x, z, 2.5, 3)
    outer_x, outer_z, _, _ = closed_forms(problem, x, z_T)
    torch.testing.assert_close(
        direction(solver, state), outer_x + jacobian.T @ outer_z, rtol=1e-11, atol=1e-12
    )
    torch.testing.assert_close(solver.z["z"], z_T, rtol=1e-12, atol=1e-13)


def test_implicit_anywhere_and_its_warm_started_conjugate_gradient(problem):
    """From any z, T = 3: grad_x F + B^T q with A q = grad_z F at z_T (d2_xz G = -B^T), and
    v = -q; the same as
    the engine's own implicit-cg (cold CG) at that point. Warm-started from v*(x) at z*(x), CG
    needs no iteration; from v = 0, some."""
    x, z = vector(6, 3), vector(7, 5)
    solver, state = at(problem, "implicit", x, z, inner_steps=3, **REFERENCE)
    found = direction(solver, state)
    z_T, _ = truncated_run(problem, x, z, 2.5, 3)
    outer_x, outer_z, A, B = closed_forms(problem, x, z_T)
    q = torch.linalg.solve(A, outer_z)
    torch.testing.assert_close(found, outer_x + B.T @ q, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(solver.v["z"], -q, rtol=1e-9, atol=1e-11)

    everything_in, everything_out = torch.arange(64), torch.arange(32)
    engine = bilevel.hypergradient(
        lambda p, h: problem.inner(h, p, everything_in),
        lambda p, h: problem.outer(h, p, everything_out),
        {"z": z.clone()},
        {"x": x.clone().requires_grad_(True)},
        bilevel.sgd(lr=2.5),
        3,
        method="implicit-cg",
    )
    torch.testing.assert_close(found, engine.grads["x"], rtol=1e-10, atol=1e-11)

    x = problem.minimiser + 4 * vector(5, 3)
    z_star, v_star = problem.inner_solution(x), problem.linear_solution(x)
    for v, iterations in ((v_star, 0), (torch.zeros(5, dtype=torch.float64), 5)):
        solver, state = at(problem, "implicit", x, z_star, v, inner_steps=2, **REFERENCE)
        torch.testing.assert_close(direction(solver, state), problem.gradient(x), rtol=1e-9, atol=0)
        assert solver.linear_info["iterations"] == iterations
        assert solver.linear_info["residual"] < 1e-10


# -- F2SA: the penalty direction --------------------------------------------------------------


def test_f2sa_direction_approaches_grad_h_as_the_penalty_grows(problem):
    """At z = z*(x) and y = y*_lam(x) = argmin F/lam + G (fixed points of the inner loop), full
    batches, constant lam: the direction is grad_x F - lam B^T (y - z) exactly, and its error
    to grad h falls as 1/lam: lam * error / ||grad h|| = 1.98, 2.67, 2.76 at lam = 10, 100,
    1000 (first order in 1/lam, constant 2.8); v = lam (y - z) approaches v*(x) alike
    (lam * relative error 2.61, 3.49, 3.61)."""
    x = problem.minimiser + 4 * vector(5, 3)
    z_star = problem.inner_solution(x)
    outer_x, _, A, B = closed_forms(problem, x, z_star)
    exact, scaled, scaled_v = problem.gradient(x), [], []
    for lam in (10.0, 100.0, 1000.0):
        y = torch.linalg.solve(A + problem.C_mean / lam, B @ x + problem.r / lam)
        settings = dict(penalty=lam, inner_steps=2, inner_step=1.0, outer_step=0.5, **FULL)
        solver, state = at(problem, "f2sa", x, z_star, memory={"y": y}, **settings)
        found = direction(solver, state)
        torch.testing.assert_close(found, outer_x - lam * B.T @ (y - z_star), rtol=1e-9, atol=0)
        torch.testing.assert_close(solver.v["z"], lam * (y - z_star), rtol=1e-9, atol=0)
        error = torch.linalg.vector_norm(found - exact) / torch.linalg.vector_norm(exact)
        scaled.append(float(lam * error))
        v_star = problem.linear_solution(x)
        scaled_v.append(float(lam * (solver.v["z"] - v_star).norm() / v_star.norm()))
    assert scaled == pytest.approx([1.98, 2.67, 2.76], abs=0.01)
    assert scaled_v == pytest.approx([2.61, 3.49, 3.61], abs=0.01)


# -- BOME: the dynamic barrier -----------------------------------------------------------------


def bome_step(problem, x, y, rho, steps, eta):
    """BOME's full-batch direction on (x, y) and its multiplier, by the closed forms."""
    A, B = problem.A_mean, problem.B_mean
    theta = y.clone()
    for _ in range(steps):
        theta = theta - rho * (A @ theta - B @ x)
    outer_x, outer_z, _, _ = closed_forms(problem, x, y)
    objective = torch.cat([outer_x, outer_z])
    constraint = torch.cat([-B.T @ (y - theta), A @ y - B @ x])  # grad q^ in (x, y)
    squared = constraint @ constraint
    lam = max(float(eta * squared - objective @ constraint), 0.0) / float(squared)
    return objective + lam * constraint, constraint, lam


@pytest.mark.parametrize("offset, eta, active", [(0.3, 2.0, True), (None, 0.7, False)])
def test_bome_moves_x_and_y_along_the_dynamic_barrier_direction(problem, offset, eta, active):
    """Full batches: x and y move along grad F + lam grad q^ (closed forms) with lam from the
    barrier rule, so the step decreases q^ at least at rate phi = eta ||grad q^||^2: exactly
    phi where the barrier is active (lam > 0: y = z*(x) + 0.3 u here), more where grad F
    alone already does (lam = 0: a random y)."""
    x = vector(6, 3)
    y = vector(7, 5) if offset is None else problem.inner_solution(x) + offset * vector(9, 5)
    settings = {"inner_step": 2.5, "outer_step": 0.1, "inner_steps": 4, "eta": eta, **FULL}
    solver, state = at(problem, "bome", x, y, **settings)
    found = torch.cat([direction(solver, state), (state["z"] - solver.z["z"]) / 0.1])
    expected, constraint, lam = bome_step(problem, x, y, 2.5, 4, eta)
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-12)
    assert solver.multiplier == pytest.approx(lam, rel=1e-10, abs=0) and (lam > 0) == active
    phi = eta * float(constraint @ constraint)
    if active:
        assert float(found @ constraint) == pytest.approx(phi, rel=1e-10)
    else:
        assert float(found @ constraint) > phi


def test_bome_at_the_inner_solution_follows_grad_f(problem):
    """At y = z*(x), theta_T = y: grad q^ is zero, lam = 0 and (x, y) move along grad F."""
    x = vector(6, 3)
    z_star = problem.inner_solution(x)
    settings = {"inner_step": 2.5, "outer_step": 0.1, "inner_steps": 4, **FULL}
    solver, state = at(problem, "bome", x, z_star, **settings)
    outer_x, outer_z, _, _ = closed_forms(problem, x, z_star)
    torch.testing.assert_close(direction(solver, state), outer_x, rtol=1e-10, atol=1e-12)
    assert solver.multiplier == 0.0
    torch.testing.assert_close(solver.z["z"], z_star - 0.1 * outer_z, rtol=1e-10, atol=1e-12)


# -- PZOBO: the zeroth-order Jacobian estimate -------------------------------------------------


def test_pzobo_direction_is_the_truncated_hypergradient_in_expectation(problem):
    """Full batches from z_0 = z*(x): z_N is affine in x, so each difference of trajectories is
    exactly (dz_N/dx) u and the estimate 1/Q sum u u^T (dz_N/dx)^T grad_z F is unbiased for any
    mu: its mean over 120 seeded draws (Q = 3 each) is within 4.5 standard errors of
    grad_x F + (dz_N/dx)^T grad_z F, which is grad h up to ||(I - rho A)^N|| (0.25^4)."""
    x = problem.minimiser + 4 * vector(5, 3)
    z_star = problem.inner_solution(x)
    settings = {"inner_step": 2.5, "outer_step": 0.3, "inner_steps": 4, "directions": 3}
    solver, state = at(problem, "pzobo", x, z_star, perturbation=0.5, **settings, **FULL)
    draws = []
    for seed in range(120):
        solver.load_state_dict(state)
        solver.sampler.generator.manual_seed(seed)
        draws.append(direction(solver, state))
    draws = torch.stack(draws)
    _, jacobian = truncated_run(problem, x, z_star, 2.5, 4)
    outer_x, outer_z, _, _ = closed_forms(problem, x, z_star)
    expected = outer_x + jacobian.T @ outer_z
    mean, error = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert bool(((mean - expected).abs() <= 4.5 * error).all()), (mean, expected, error)
    exact = problem.gradient(x)
    bias = torch.linalg.vector_norm(expected - exact) / torch.linalg.vector_norm(exact)
    assert 0 < bias < 0.25**4
    assert float(error.max()) < 0.1 * float(exact.abs().max())  # the test can tell a bias


# -- convergence -------------------------------------------------------------------------------

MINIBATCH_REFERENCE = dict(inner_step=1.5, outer_step=2.0, outer_decay=0.6)
F2SA = dict(inner_step=1.0, outer_step=1.0, inner_steps=3, penalty=10.0, penalty_growth=0.5)
CONVERGENCE = {
    # case: (solver, settings, iterations, tolerance on ||x - x*|| / ||x*||), batches of 32
    # unless FULL; the comment: the errors measured over solver seeds 0-4
    "f2sa": ("f2sa", dict(**F2SA, inner_decay=0.4, outer_decay=0.6), 300, 0.05),  # 1.0-2.7%
    # one step xi on (x, y): h's slow rate xi mu_h, and a floor that shrinks with xi
    "bome": ("bome", dict(inner_step=2.5, outer_step=0.1, inner_steps=3), 400, 0.15),  # 7.6-12%
    "pzobo": (
        "pzobo",
        dict(inner_step=2.5, outer_step=2.0, inner_steps=4, directions=2, outer_decay=0.6),
        300,
        0.1,  # 1.8-7.0%
    ),
    # full batches (deterministic): unrolled's floor is its truncation, (I - rho A)^10
    "unrolled-full": ("unrolled", dict(REFERENCE, outer_step=3.0, inner_steps=10), 40, 1e-5),
    "implicit-full": ("implicit", dict(REFERENCE, outer_step=3.0, inner_steps=3), 40, 1e-8),
    "unrolled-minibatch": ("unrolled", dict(MINIBATCH_REFERENCE, inner_steps=5), 100, 0.05),
    "implicit-minibatch": ("implicit", dict(MINIBATCH_REFERENCE, inner_steps=3), 100, 0.05),
}  # measured: unrolled 2.9e-7 and 1.0-3.2%, implicit 2.3e-11 and 0.5-2.5%


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CONVERGENCE))
def test_every_solver_converges_to_the_minimiser_of_the_value_function(problem, case):
    name, settings, iterations, tolerance = CONVERGENCE[case]
    settings = {"inner_batch": 32, "outer_batch": 32, **settings}
    solver = stochastic.make(name, problem, evaluate_every=iterations, **settings)
    (last,) = solver.run(iterations)
    error = torch.linalg.vector_norm(solver.x["x"] - problem.minimiser)
    assert float(error / torch.linalg.vector_norm(problem.minimiser)) < tolerance
    assert last["distance"] == pytest.approx(float(error), rel=1e-12)


# -- resumption and samples ------------------------------------------------------------------

SMALL = {
    "f2sa": {"inner_steps": 2, "penalty": 5.0, "penalty_growth": 0.5},
    "bome": {"inner_steps": 2},
    "pzobo": {"inner_steps": 2, "directions": 2},
    "unrolled": {"inner_steps": 2},
    "implicit": {"inner_steps": 2},
}


@pytest.mark.parametrize("name", NAMES)
def test_a_killed_run_continues_with_the_same_numbers(problem, name, monkeypatch):
    """test_stochastic's check, with these solvers' settings: 10 steps, a checkpoint, then 20
    more uninterrupted and 20 from the checkpoint in a new solver with another seed give equal
    iterates (x, z, v; F2SA's y through v = lam (y - z)), history and samples."""
    monkeypatch.setitem(RESUME_SETTINGS, name, SMALL[name])
    resumes_exactly(problem, name)


@pytest.mark.parametrize(
    "name, inner, outer",
    [  # per iteration with T = 2 inner steps, inner batch 4, outer batch 3
        ("f2sa", 2 * (2 * 4) + 2 * 4, 2 * 3 + 3),  # z and y share a batch; x: g at y and z
        ("bome", 2 * 4 + 2 * 4, 3),  # theta's steps; grad q^ at y and theta_T
        ("pzobo", (2 + 1) * 2 * 4, 3),  # Q = 2 perturbed trajectories and the unperturbed
        ("unrolled", 2 * 4, 3),
        ("implicit", 2 * 4 + 4, 3),  # the system's gradient at z_T
    ],
)
def test_samples_are_counted_as_documented(problem, name, inner, outer):
    settings = {"inner_step": 0.5, "outer_step": 0.3, "inner_batch": 4, "outer_batch": 3}
    solver = stochastic.make(name, problem, evaluate_every=10**6, **settings, **SMALL[name])
    solver.run(3)
    assert solver.samples == {"inner": 3 * inner, "outer": 3 * outer}


# -- errors: one clear line each -----------------------------------------------------------

GOOD = {"inner_step": 0.5, "outer_step": 0.1}


@pytest.mark.parametrize(
    "name, settings, error, words",
    [
        ("f2sa", {"penalty": 0}, ValueError, "f2sa: penalty must be a number > 0, got 0"),
        ("f2sa", {"penalty_growth": -1}, ValueError, "f2sa: penalty_growth must be a number >= 0"),
        ("f2sa", {"inner_steps": 0}, ValueError, "f2sa: inner_steps must be an integer >= 1"),
        ("bome", {"eta": float("nan")}, ValueError, "bome: eta must be a number > 0, got nan"),
        ("bome", {"inner_steps": 1.5}, TypeError, "bome: inner_steps must be an integer >= 1"),
        ("pzobo", {"perturbation": -0.1}, ValueError, "pzobo: perturbation must be a number > 0"),
        ("pzobo", {"directions": 0}, ValueError, "pzobo: directions must be an integer >= 1"),
        ("unrolled", {"inner_batch": 65}, ValueError, "unrolled: inner_batch=65 is larger than"),
        ("implicit", {"cg_iterations": 0}, ValueError, "implicit: cg_iterations must be an integ"),
        ("implicit", {"cg_tolerance": -1.0}, ValueError, "implicit: cg_tolerance must be a numb"),
        ("implicit", {"outer_step": 0}, ValueError, "implicit: outer_step must be a number > 0"),
        (
            "bome",
            {"linear_step": 0.1},
            TypeError,
            "unknown setting 'linear_step' for solver 'bome'",
        ),
        ("pzobo", {"penalty": 1.0}, TypeError, "unknown setting 'penalty' for solver 'pzobo'"),
    ],
)
def test_bad_settings_are_one_clear_line(problem, name, settings, error, words):
    with pytest.raises(error) as caught:
        stochastic.make(name, problem, **{**GOOD, **settings})
    message = str(caught.value)
    assert "\n" not in message and words in message


@pytest.mark.parametrize("solver", [stochastic.BOME, stochastic.PZOBO, stochastic.Implicit])
def test_a_step_size_that_does_not_apply_is_refused_not_ignored(problem, solver):
    with pytest.raises(TypeError) as caught:
        solver(problem, linear_step=0.1, **GOOD)
    assert str(caught.value) == (
        f"{solver.name}: linear_step does not apply ({solver.name} takes no step on a linear "
        "system)"
    )


def test_the_solvers_are_registered():
    assert set(NAMES) <= set(stochastic.SOLVERS)
    for name in NAMES:
        assert stochastic.SOLVERS[name].name == name
