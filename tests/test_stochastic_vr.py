"""The stochastic solvers with Neumann-series, recursive-momentum and recursive (SARAH) estimates
(TTSA, BSA, MRBO, VRBO, SRBA, SUSTAIN, FSLA) on a small quadratic whose value function is known
in closed form: convergence to its minimiser, the variance-reduced ones against SOBA at equal
samples, the mean of every direction against its closed form, exact resumption and one-line
errors. All in float64, all seeded."""

import functools
import io
import math

import pytest
import torch

from bilevel import stochastic

from .test_stochastic import assert_mean, vector

NEW = ["ttsa", "bsa", "mrbo", "vrbo", "srba", "sustain", "fsla"]
NEUMANN = {"ttsa", "bsa", "mrbo", "vrbo", "sustain"}
ETA = 1.6  # the series' step: (I - eta A) contracts by 0.1 on A's spectrum [0.56, 0.64]


def make_problem():
    # Well conditioned so that a few Neumann terms suffice (every sample's Hessian has
    # eigenvalues 0.5 and 1, their mean [0.56, 0.64]; h's Hessian [0.51, 0.53]).
    return stochastic.QuadraticProblem(
        n_inner=64, n_outer=32, dim_inner=5, dim_outer=3, mu_inner=0.5, mu_outer=0.5
    )


@pytest.fixture(scope="module")
def problem():
    return make_problem()


# -- closed forms: the mean of each estimate ------------------------------------------------


def inner_gradient(problem, x, z):
    """grad_z G(x, z)."""
    return problem.A_mean @ z - problem.B_mean @ x


def exact_direction(problem, x, z, v):
    """grad_x F(x, z) + d2_xz G v: the hypergradient when z = z*(x) and v = v*(x)."""
    return problem.mu_outer * x + problem.e_mean - problem.B_mean.T @ v


def neumann_v(problem, z, terms):
    """The mean of every Neumann estimate of v with `terms` terms (summed or randomly truncated):
    -eta sum_{q < terms} (I - eta A)^q (grad_z F)."""
    term = problem.C_mean @ z - problem.r
    total = torch.zeros_like(term)
    for _ in range(terms):
        total = total + term
        term = term - ETA * problem.A_mean @ term
    return -ETA * total


def series_terms(settings):
    return (
        settings["neumann_steps"] + 1 if "neumann_steps" in settings else settings["neumann_terms"]
    )


def neumann_direction(problem, settings, x, z):
    """The mean of a Neumann solver's x-direction at (x, z)."""
    return exact_direction(problem, x, z, neumann_v(problem, z, series_terms(settings)))


def test_the_truncated_series_is_within_its_bound_of_the_hypergradient(problem):
    """What the Neumann solvers' directions average to at (x, z*(x)): grad h(x) up to the series'
    truncation, |B^T (v_T - v*)| <= |B| rho^T |v*| with rho = max |1 - eta lambda(A)|, which
    vanishes as the terms grow."""
    x = problem.minimiser + 4 * vector(5, 3)
    z, exact = problem.inner_solution(x), problem.gradient(x)
    v_star = problem.linear_solution(x)
    rho = float((1 - ETA * torch.linalg.eigvalsh(problem.A_mean)).abs().max())
    bound_scale = float(torch.linalg.matrix_norm(problem.B_mean, 2) * v_star.norm())
    for terms in (1, 3, 5):
        error = (exact_direction(problem, x, z, neumann_v(problem, z, terms)) - exact).norm()
        assert 0 < error <= bound_scale * rho**terms
    converged = exact_direction(problem, x, z, neumann_v(problem, z, 60))
    torch.testing.assert_close(converged, exact, rtol=1e-12, atol=1e-14)


# -- convergence, and variance reduction at equal samples ------------------------------------

COMMON = {"inner_step": 1.0, "outer_step": 1.0, "inner_batch": 16, "outer_batch": 8}
DECREASING = {"inner_decay": 0.4, "outer_decay": 0.6}  # SOBA's paper schedule
AVERAGING = {"momentum": 1.0, "momentum_decay": 1.0}  # recursive momentum weight a_k = 1/k
BUDGET = 12_000  # samples, inner and outer together
VARIANCE_REDUCED = {
    "mrbo": {**AVERAGING, "neumann_steps": 2, "hessian_batch": 4, "linear_step": ETA},
    "vrbo": {
        "inner_steps": 1,
        "period": 10,
        "neumann_steps": 4,
        "hessian_batch": 4,
        "linear_step": ETA,
    },
    "srba": {},  # constant steps; the default period (a full pass's worth of minibatches)
    "sustain": {**AVERAGING, "neumann_terms": 3, "hessian_batch": 4, "linear_step": ETA},
}


@functools.cache
def run_to_budget(name, seed):
    """(the solver after the first step that reaches BUDGET samples, its evaluation), with
    COMMON's steps and batches (SOBA with DECREASING steps)."""
    settings = {**COMMON, **(DECREASING if name == "soba" else VARIANCE_REDUCED[name])}
    solver = stochastic.make(name, make_problem(), seed=seed, evaluate_every=10**9, **settings)
    while solver.samples["inner"] + solver.samples["outer"] < BUDGET:
        solver.step()
    return solver, solver.evaluate()


# the paper's schedule for a strongly convex outer problem (TTSA's Theorem: alpha_k ~ 1/k,
# beta_k ~ k^-2/3), the first outer step 1 / (h's curvature)
STRONGLY_CONVEX = {"inner_decay": 2 / 3, "outer_decay": 1.0, "outer_step": 2.0}
LARGER = {"inner_batch": 32, "outer_batch": 24}
CONVERGENCE = {
    # name: (settings, iterations, tolerance on ||x - x*|| / ||x*||). Measured over solver
    # seeds 0-4: ttsa 2.3-17% (its randomly truncated series is noisy: N prod(...) is 3b or
    # about b/3), bsa 3.6-14%, fsla 1.2-3.8%. The variance-reduced solvers run to BUDGET
    # samples (run_to_budget, seed 0; seeds 0-2 measured): mrbo 3.9-5.3% (375 iterations),
    # vrbo 1.7e-6 (102; its truncation bias), srba 3e-16 (285), sustain 4.0-7.9% (428).
    "ttsa": (
        {**STRONGLY_CONVEX, **LARGER, "neumann_terms": 3, "hessian_batch": 32, "linear_step": ETA},
        300,
        0.25,
    ),
    "bsa": (
        {
            **STRONGLY_CONVEX,
            **LARGER,
            "inner_steps": 2,
            "neumann_terms": 3,
            "hessian_batch": 32,
            "linear_step": ETA,
        },
        200,
        0.25,
    ),
    "fsla": ({**STRONGLY_CONVEX, **LARGER, "momentum": 1.0, "momentum_decay": 0.5}, 300, 0.08),
    "mrbo": (None, None, 0.1),
    "vrbo": (None, None, 1e-5),  # the series' truncation after Q + 1 = 5 terms: 1.7e-6
    "srba": (None, None, 1e-12),
    "sustain": (None, None, 0.15),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", NEW)
def test_every_solver_converges_to_the_minimiser_of_the_value_function(problem, name):
    settings, iterations, tolerance = CONVERGENCE[name]
    if settings is None:
        solver, last = run_to_budget(name, 0)
    else:
        solver = stochastic.make(name, problem, evaluate_every=iterations, **{**COMMON, **settings})
        (last,) = solver.run(iterations)
    error = torch.linalg.vector_norm(solver.x["x"] - problem.minimiser)
    assert float(error / torch.linalg.vector_norm(problem.minimiser)) < tolerance
    assert last["distance"] == pytest.approx(float(error), rel=1e-12)


def geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


# the noisier runs are averaged over more seeds (VRBO's and SRBA's gaps are orders of magnitude
# below SOBA's on every seed)
SEEDS = {"soba": 3, "mrbo": 3, "sustain": 3, "vrbo": 1, "srba": 1}


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(VARIANCE_REDUCED))
def test_variance_reduction_beats_soba_at_equal_samples(name):
    """Suboptimality h(x) - h* after BUDGET samples (geometric means over solver seeds 0-2 for
    SOBA, MRBO and SUSTAIN, seed 0 for VRBO and SRBA) against SOBA with its paper's decreasing
    steps, at the same budget and batch sizes. Samples are counted as drawn, though the
    recursive estimators evaluate each at two points (MRBO makes 3x SOBA's oracle calls here).

    Measured (seeds 0, 1, 2): soba 8.3e-5 2.0e-4 5.3e-5 (mean 9.5e-5); mrbo 5.0e-5 4.5e-5
    2.6e-5 (3.9e-5); sustain 2.7e-5 5.9e-5 1.1e-4 (5.6e-5: on seed 2 alone it is worse than
    SOBA's seed 2); vrbo 5.1e-14 (the floor of its truncated series); srba 2e-33 (zero in
    float64). MRBO's and SUSTAIN's margins are modest at this budget: with a_k = 1/k their
    suboptimality falls roughly like 1/k, SOBA's like its step k^-0.6; SRBA and VRBO
    converge linearly."""
    gaps = {
        solver: geometric_mean(
            [run_to_budget(solver, seed)[1]["suboptimality"] for seed in range(SEEDS[solver])]
        )
        for solver in ("soba", name)
    }
    assert gaps[name] < gaps["soba"]


# -- the mean of each direction --------------------------------------------------------------

STEPS = {"inner_step": 0.5, "outer_step": 0.3, "inner_batch": 16, "outer_batch": 8}
DIRECTION_SETTINGS = {
    "ttsa": {"neumann_terms": 3, "hessian_batch": 16, "linear_step": ETA},
    "bsa": {"inner_steps": 2, "neumann_terms": 3, "hessian_batch": 16, "linear_step": ETA},
    "mrbo": {"momentum": 0.4, "neumann_steps": 2, "hessian_batch": 16, "linear_step": ETA},
    "vrbo": {
        "inner_steps": 1,
        "period": 4,
        "neumann_steps": 2,
        "hessian_batch": 16,
        "large_inner_batch": 32,
        "large_outer_batch": 16,
        "linear_step": ETA,
    },
    "srba": {"period": 4, "linear_step": 0.4},
    "sustain": {"momentum": 0.4, "neumann_terms": 3, "hessian_batch": 16, "linear_step": ETA},
    "fsla": {"momentum": 0.4, "linear_step": 0.4},
}
DRAWS = 150


def solver_at(problem, name, x, z, v, iteration=0, memory=None):
    """A solver of `name` and a state of it at (x, z, v) after `iteration` iterations, with
    `memory` (the solver's own, as its state_dict names it) replaced where given."""
    solver = stochastic.make(
        name, problem, evaluate_every=10**6, **{**STEPS, **DIRECTION_SETTINGS[name]}
    )
    state = solver.state_dict()
    state.update(x=x.clone(), z=z.clone(), v=v.clone(), iteration=iteration)
    state["memory"].update(memory or {})
    return solver, state


def draw_steps(solver, state, read):
    """For DRAWS seeds: restore `state`, seed the sampler, take one step and record
    read(solver, state) (a dict of vectors). Returns {key: (DRAWS, size) tensor}."""
    found = {}
    for seed in range(DRAWS):
        solver.load_state_dict(state)
        solver.sampler.generator.manual_seed(seed)
        solver.step()
        for key, value in read(solver, state).items():
            found.setdefault(key, []).append(value)
    return {key: torch.stack(values) for key, values in found.items()}


def moved(solver, state):
    """The directions the step moved x, z and v along (constant steps)."""
    s = solver.settings
    return {
        "x": (state["x"] - solver.x["x"]) / s["outer_step"],
        "z": (state["z"] - solver.z["z"]) / s["inner_step"],
        "v": (state["v"] - solver.v["z"]) / s["linear_step"],
    }


@pytest.mark.e2e
@pytest.mark.parametrize("name", NEW)
def test_a_fresh_x_direction_at_the_solution_averages_to_the_hypergradient(problem, name):
    """At (x, z*(x), v*(x)), x away from x*, the first step's x-direction (no memory yet: plain
    estimates for MRBO, SUSTAIN and FSLA, a refresh on large random batches for VRBO, a full
    pass for SRBA) averages to grad h(x) for SRBA and FSLA, and to the truncated series' mean
    for the Neumann solvers (within the bound tested above). TTSA's and BSA's direction is
    taken after their z steps: its mean is the series at the mean z, z*(x) itself (SGD's
    steps are affine, with minibatches independent of the iterates)."""
    x = problem.minimiser + 4 * vector(5, 3)
    z, v = problem.inner_solution(x), problem.linear_solution(x)
    solver, state = solver_at(problem, name, x, z, v)
    draws = draw_steps(solver, state, moved)["x"]
    if name in NEUMANN:
        expected = neumann_direction(problem, solver.settings, x, z)
    else:
        expected = problem.gradient(x)
    if name == "srba":  # a full pass: no randomness at all
        for draw in draws:
            torch.testing.assert_close(draw, expected, rtol=1e-12, atol=1e-13)
    assert_mean(draws, expected)


@pytest.mark.e2e
def test_recursive_momentum_carries_the_last_error_shrunk_by_one_minus_the_weight(problem):
    """MRBO and SUSTAIN with memories of another point: the mean of each new direction is the
    mean estimate at (x, z) plus (1 - a) times the stored direction's error at the previous
    iterates, u_k = grad G + (1 - a)(u_{k-1} - grad G(x', z')), the same for d with the series."""
    x, z, x_prev, z_prev = vector(6, 3), vector(7, 5), vector(8, 3), vector(9, 5)
    u_prev, d_prev = vector(10, 5), vector(11, 3)
    for name in ("mrbo", "sustain"):
        memory = {"directions": [u_prev, d_prev], "previous": [x_prev, z_prev]}
        solver, state = solver_at(problem, name, x, z, z, iteration=5, memory=memory)
        draws = draw_steps(solver, state, moved)
        keep = 1 - solver.settings["momentum"]
        settings = solver.settings
        expected_u = inner_gradient(problem, x, z) + keep * (
            u_prev - inner_gradient(problem, x_prev, z_prev)
        )
        expected_d = neumann_direction(problem, settings, x, z) + keep * (
            d_prev - neumann_direction(problem, settings, x_prev, z_prev)
        )
        assert_mean(draws["z"], expected_u)
        assert_mean(draws["x"], expected_d)


def test_fsla_steps_v_once_and_averages_its_estimates_recursively(problem):
    """FSLA from (x, z, v) with a memory of another point: z and v each take one step (their
    means: full-batch steps, v's at the mean new z), and the x-direction averages to the exact
    direction at those means plus (1 - a) times the stored direction's error at the stored
    point."""
    x, z, v = vector(6, 3), vector(7, 5), vector(8, 5)
    point, d_prev = [vector(9, 3), vector(10, 5), vector(11, 5)], vector(12, 3)
    memory = {"direction": d_prev, "previous": point}
    solver, state = solver_at(problem, "fsla", x, z, v, iteration=5, memory=memory)
    draws = draw_steps(solver, state, moved)
    s = solver.settings
    z_mean = z - s["inner_step"] * inner_gradient(problem, x, z)
    v_mean = v - s["linear_step"] * (problem.A_mean @ v + problem.C_mean @ z_mean - problem.r)
    expected = exact_direction(problem, x, z_mean, v_mean) + (1 - s["momentum"]) * (
        d_prev - exact_direction(problem, *point)
    )
    assert_mean(draws["z"], inner_gradient(problem, x, z))
    assert_mean(draws["x"], expected)


def soba_directions(problem, x, z, v):
    """SOBA's full-batch directions (D_z, D_v, D_x) at (x, z, v)."""
    d_v = problem.A_mean @ v + problem.C_mean @ z - problem.r
    return inner_gradient(problem, x, z), d_v, exact_direction(problem, x, z, v)


def test_srba_corrections_keep_the_error_of_its_directions_in_expectation(problem):
    """SRBA between full passes, with stored directions D' and previous iterates p: the mean of
    each new direction is D' + D(x, z, v) - D(p) (SARAH: the error D' - D(p) is carried on
    unchanged in expectation)."""
    x, z, v = vector(6, 3), vector(7, 5), vector(8, 5)
    point = [vector(9, 3), vector(10, 5), vector(11, 5)]
    stored = [vector(12, 5), vector(13, 5), vector(14, 3)]
    memory = {"directions": stored, "previous": point}
    solver, state = solver_at(problem, "srba", x, z, v, iteration=5, memory=memory)
    draws = draw_steps(solver, state, moved)
    now, then = soba_directions(problem, x, z, v), soba_directions(problem, *point)
    for key, d, new, old in zip("zvx", stored, now, then):
        assert_mean(draws[key], d + new - old)


@pytest.mark.e2e
def test_vrbo_corrections_keep_the_error_of_its_estimates_in_expectation(problem):
    """VRBO between refreshes, with stored estimates (u, w) of errors (e_u, e_w) at (x, z): x
    moves along w exactly; after the iteration's corrections (x's move, then z's), the errors
    u' - grad G(x', z') and w' - Phi(x', z') at the new iterates average to e_u and e_w."""
    x, z = vector(6, 3), vector(7, 5)
    u, w = vector(12, 5), vector(13, 3)
    solver, state = solver_at(problem, "vrbo", x, z, z, iteration=5, memory={"directions": [u, w]})
    settings = solver.settings
    error_u = u - inner_gradient(problem, x, z)
    error_w = w - neumann_direction(problem, settings, x, z)

    def errors(solver, state):
        x_new, z_new = solver.x["x"], solver.z["z"]
        torch.testing.assert_close(x_new, x - settings["outer_step"] * w, rtol=0, atol=1e-15)
        u_new, w_new = solver.state_dict()["memory"]["directions"]
        return {
            "u": u_new - inner_gradient(problem, x_new, z_new),
            "w": w_new - neumann_direction(problem, settings, x_new, z_new),
        }

    draws = draw_steps(solver, state, errors)
    assert_mean(draws["u"], error_u)
    assert_mean(draws["w"], error_w)


# -- resumption ----------------------------------------------------------------------------

RESUME_SETTINGS = {
    "ttsa": {"neumann_terms": 3, "inner_decay": 0.4, "outer_decay": 0.6},
    "bsa": {"inner_steps": 2, "neumann_terms": 3},
    "mrbo": {"neumann_steps": 2, "momentum": 0.5, "momentum_decay": 0.5},
    "vrbo": {"inner_steps": 2, "period": 4, "neumann_steps": 2, "large_inner_batch": 20},
    "srba": {"period": 4, "radius": 5.0},
    "sustain": {"neumann_terms": 3, "momentum": 0.5, "momentum_decay": 0.5},
    "fsla": {"momentum": 0.5, "momentum_decay": 0.5, "inner_decay": 0.4},
}


def assert_same_numbers(found, expected):
    """Tensors bit-identical, lists and dicts item by item, other values equal."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(found, expected)
    elif isinstance(expected, (list, tuple)):
        assert len(found) == len(expected)
        for f, e in zip(found, expected):
            assert_same_numbers(f, e)
    elif isinstance(expected, dict):
        assert found.keys() == expected.keys()
        for key in expected:
            assert_same_numbers(found[key], expected[key])
    else:
        assert found == expected


@pytest.mark.parametrize("name", NEW)
def test_a_killed_run_continues_with_the_same_numbers(problem, name):
    """A solver restored from a checkpoint after 6 iterations (past VRBO's and SRBA's second
    refresh) and run 9 more ends in the uninterrupted run's state, bit for bit: iterates,
    memories, sampler and evaluations (all but the seconds they took, and the seed it was built
    with)."""
    settings = {
        "inner_step": 0.5,
        "outer_step": 0.3,
        "inner_batch": 4,
        "outer_batch": 3,
        "evaluate_every": 5,
        **RESUME_SETTINGS[name],
    }
    uninterrupted = stochastic.make(name, problem, seed=3, **settings)
    uninterrupted.run(6)
    checkpoint = io.BytesIO()
    torch.save(uninterrupted.state_dict(), checkpoint)
    uninterrupted.run(9)
    checkpoint.seek(0)
    resumed = stochastic.make(name, problem, seed=99, **settings)  # the state's draws win
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    resumed.run(9)
    found, expected = resumed.state_dict(), uninterrupted.state_dict()
    for entry in (found, expected):
        assert [e["iteration"] for e in entry["history"]] == [5, 10, 15]
        entry["seconds"] = entry["settings"]["seed"] = None
        for evaluation in entry["history"]:
            evaluation["seconds"] = None
    assert_same_numbers(found, expected)


# -- errors: one clear line each -----------------------------------------------------------

GOOD = {"inner_step": 0.5, "outer_step": 0.1}


@pytest.mark.parametrize(
    "name, settings, error, words",
    [
        (
            "ttsa",
            {"inner_step": -0.1},
            ValueError,
            "ttsa: inner_step must be a number > 0, got -0.1",
        ),
        ("fsla", {"outer_step": 0}, ValueError, "fsla: outer_step must be a number > 0, got 0"),
        ("bsa", {"linear_step": float("inf")}, ValueError, "bsa: linear_step must be a number > 0"),
        (
            "srba",
            {"inner_batch": 65},
            ValueError,
            "srba: inner_batch=65 is larger than the data (n_inner=64)",
        ),
        (
            "mrbo",
            {"outer_batch": 33},
            ValueError,
            "mrbo: outer_batch=33 is larger than the data (n_outer=32)",
        ),
        (
            "sustain",
            {"hessian_batch": 100},
            ValueError,
            "sustain: hessian_batch=100 is larger than the data (n_inner=64)",
        ),
        (
            "vrbo",
            {"large_inner_batch": 65},
            ValueError,
            "vrbo: large_inner_batch=65 is larger than the data (n_inner=64)",
        ),
        (
            "vrbo",
            {"large_outer_batch": 0},
            ValueError,
            "vrbo: large_outer_batch must be an integer >= 1, got 0",
        ),
        ("vrbo", {"period": 0}, ValueError, "vrbo: period must be an integer >= 1, got 0"),
        ("srba", {"period": 2.5}, TypeError, "srba: period must be an integer >= 1, got 2.5"),
        (
            "vrbo",
            {"inner_steps": 0},
            ValueError,
            "vrbo: inner_steps must be an integer >= 1, got 0",
        ),
        ("bsa", {"inner_steps": -2}, ValueError, "bsa: inner_steps must be an integer >= 1"),
        (
            "mrbo",
            {"neumann_steps": -1},
            ValueError,
            "mrbo: neumann_steps must be an integer >= 0, got -1",
        ),
        (
            "ttsa",
            {"neumann_terms": 0},
            ValueError,
            "ttsa: neumann_terms must be an integer >= 1, got 0",
        ),
        ("mrbo", {"momentum": 0}, ValueError, "mrbo: momentum must be a number in (0, 1], got 0"),
        ("sustain", {"momentum": 1.5}, ValueError, "sustain: momentum must be a number in (0, 1]"),
        (
            "fsla",
            {"momentum_decay": -0.5},
            ValueError,
            "fsla: momentum_decay must be a number >= 0, got -0.5",
        ),
        ("srba", {"radius": -1.0}, ValueError, "srba: radius must be a number > 0, got -1.0"),
        (
            "ttsa",
            {"neumann_steps": 3},
            TypeError,
            "unknown setting 'neumann_steps' for solver 'ttsa'; it accepts: neumann_terms",
        ),
        (
            "mrbo",
            {"neumann_terms": 3},
            TypeError,
            "unknown setting 'neumann_terms' for solver 'mrbo'; it accepts: momentum",
        ),
        ("vrb0", {}, ValueError, "unknown stochastic solver 'vrb0'; choose one of soba, ma-soba"),
    ],
)
def test_bad_settings_are_one_clear_line(problem, name, settings, error, words):
    with pytest.raises(error) as caught:
        stochastic.make(name, problem, **{**GOOD, **settings})
    message = str(caught.value)
    assert "\n" not in message
    assert words in message


def test_the_solvers_are_registered_and_exported():
    for name in NEW:
        assert stochastic.SOLVERS[name].name == name
        assert stochastic.SOLVERS[name].__name__ in stochastic.__all__
    with pytest.raises(ValueError) as caught:
        stochastic.make("nope", make_problem(), **GOOD)
    assert all(name in str(caught.value) for name in NEW)
