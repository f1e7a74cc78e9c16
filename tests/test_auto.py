"""method="auto": the fastest exact method whose memory fits a budget (bilevel.hypergrad.auto).

Each branch of the rule is taken on a problem built for it, with a budget placed between the
estimates the problem's own measurement gives; every hypergradient is checked against the
ridge closed form of f_T or the explicit method, in float64. The last test runs a problem in
fresh processes and measures their peak memory: auto stays under its budget, the graph not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bilevel
from bilevel.hypergrad.auto import MAX_FORWARD_HPARAMS, Sizes, forward_bytes, segment_bytes

from .problems import DTYPE, Ridge, SmallMLP, relative_error
from .test_randomness import dropout_problem, unrolled_by_autograd

LR = 0.3


def ridge_problem(ridge: Ridge, steps: int, **options) -> bilevel.Problem:
    return bilevel.Problem.create(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        ridge.hparams(),
        bilevel.sgd(lr=LR),
        steps,
        "auto",
        options,
    )


def estimates_at(decision: dict, every) -> np.ndarray:
    """The decision's reverse-mode estimates for segments of `every` steps."""
    sizes = Sizes(**decision["sizes"])
    return decision["allocator_factor"] * segment_bytes(sizes, np.asarray(every))


def assert_exact(ridge: Ridge, result: bilevel.Result, steps: int) -> None:
    value, grad = ridge.exact_T(steps, LR)
    assert abs(result.value - value) <= 1e-12 * abs(value)
    assert relative_error(result.grads["gamma"], grad) < 1e-10


def test_graph_when_the_whole_graph_fits():
    ridge, T = Ridge(), 60
    problem = ridge_problem(ridge, T, memory_budget=1e9)
    assert (problem.method, dict(problem.options)) == ("reverse", {"memory": "graph"})
    result = problem.hypergradient(ridge.hparams())
    assert result.method == "reverse"
    decision = result.info["auto"]
    assert decision["method"] == "reverse" and decision["options"] == {"memory": "graph"}
    assert decision["estimates"]["graph"] <= 1e9 == decision["memory_budget"]
    assert decision["budget_source"] == "given" and "fits" in decision["reason"]
    assert decision["sizes"]["steps"] == T and decision["sizes"]["hparams"] == ridge.d
    assert_exact(ridge, result, T)


def test_trajectory_when_only_segments_of_one_step_fit():
    """Many examples, few parameters: a step's graph outweighs two stored states, so
    segments of two steps need more memory than segments of one."""
    ridge, T = Ridge(n=4000), 6
    probe = ridge_problem(ridge, T, memory_budget=1e9).auto
    budget = probe["estimates"]["trajectory"]
    assert estimates_at(probe, range(2, T + 1)).min() > budget  # only k = 1 fits
    problem = ridge_problem(ridge, T, memory_budget=budget)
    assert (problem.method, dict(problem.options)) == ("reverse", {"memory": "trajectory"})
    assert_exact(ridge, problem.hypergradient(ridge.hparams()), T)


def test_activations_when_the_graph_does_not_fit_and_they_do():
    """Example-weighted logistic regression: a step's whole graph keeps the objective's
    activations and the graph of its gradient, so a budget between the estimates of the two
    picks memory="activations", which gives the explicit graph policy's hypergradient.
    (On a quadratic the gradient is linear in the residuals, its graph keeps no per-step
    tensor, and the whole graph is the smaller one.)"""
    g = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(3000, 10, generator=g, dtype=DTYPE),
        torch.randint(0, 2, (3000,), generator=g),
    )
    params = {"w": torch.zeros(10, dtype=DTYPE)}
    hparams = {"weights": torch.zeros(3000, dtype=DTYPE, requires_grad=True)}

    def inner(p, h):
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            X @ p["w"], y.to(DTYPE), reduction="none"
        )
        return (torch.sigmoid(h["weights"]) * losses).mean()

    def outer(p, h):
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ p["w"], y.to(DTYPE))

    def create(**options):
        return bilevel.Problem.create(
            inner, outer, params, hparams, bilevel.sgd(lr=0.5), 30, "auto", options
        )

    probe = create(memory_budget=1e9).auto["estimates"]
    assert probe["activations"] < probe["graph"]
    problem = create(memory_budget=(probe["activations"] + probe["graph"]) / 2)
    assert (problem.method, dict(problem.options)) == ("reverse", {"memory": "activations"})
    assert "activations fit" in problem.auto["reason"]
    explicit = bilevel.hypergradient(inner, outer, params, hparams, bilevel.sgd(lr=0.5), 30)
    torch.testing.assert_close(
        problem.hypergradient(hparams).grads["weights"],
        explicit.grads["weights"],
        rtol=1e-12,
        atol=0,
    )


def test_checkpoint_with_the_longest_segments_that_fit():
    ridge, T = Ridge(), 100
    probe = ridge_problem(ridge, T, memory_budget=1e9).auto
    budget = float(estimates_at(probe, 10))
    assert budget < min(probe["estimates"]["graph"], probe["estimates"]["trajectory"])
    problem = ridge_problem(ridge, T, memory_budget=budget)
    every = problem.options["checkpoint_every"]
    assert problem.method == "reverse" and problem.options["memory"] == "checkpoint"
    assert 10 <= every < T and "replaying" in problem.auto["reason"]
    assert estimates_at(problem.auto, every) <= budget
    assert (estimates_at(problem.auto, range(every + 1, T + 1)) > budget).all()  # the longest
    result = problem.hypergradient(ridge.hparams())
    assert_exact(ridge, result, T)
    explicit = bilevel.hypergradient(
        ridge.inner, ridge.outer, ridge.params(), ridge.hparams(), bilevel.sgd(lr=LR), T,
        "reverse", memory="checkpoint", checkpoint_every=every,
    )  # fmt: skip
    torch.testing.assert_close(result.grads["gamma"], explicit.grads["gamma"], rtol=0, atol=0)


def forward_budget(ridge: Ridge, steps: int, name: str = "forward") -> tuple[dict, float]:
    """A budget under every reverse-mode estimate and over forward mode's (`name`: vectorized,
    or forward-loop) on a long run."""
    probe = ridge_problem(ridge, steps, memory_budget=1e9).auto
    smallest_reverse = estimates_at(probe, range(1, steps + 1)).min()
    assert probe["estimates"][name] < smallest_reverse
    return probe, (probe["estimates"][name] + smallest_reverse) / 2


def test_forward_for_few_hyperparameters_and_a_long_run():
    ridge, T = Ridge(), 500
    probe, budget = forward_budget(ridge, T)
    assert probe["sizes"]["hparams"] <= MAX_FORWARD_HPARAMS
    problem = ridge_problem(ridge, T, memory_budget=budget)
    assert (problem.method, dict(problem.options)) == ("forward", {"vectorize": True})
    assert "no reverse policy fits" in problem.auto["reason"]
    assert_exact(ridge, problem.hypergradient(ridge.hparams()), T)


def test_forward_in_turn_when_the_vectorized_products_do_not_fit():
    ridge, T = Ridge(), 500
    probe, _ = forward_budget(ridge, T)
    loop, vectorized = probe["estimates"]["forward-loop"], probe["estimates"]["forward"]
    assert loop < vectorized
    problem = ridge_problem(ridge, T, memory_budget=(loop + vectorized) / 2)
    assert (problem.method, dict(problem.options)) == ("forward", {"vectorize": False})
    assert_exact(ridge, problem.hypergradient(ridge.hparams()), T)


def test_forward_is_never_chosen_when_w0_needs_a_gradient():
    ridge, T = Ridge(), 500
    _, budget = forward_budget(ridge, T)
    w0 = {"w": torch.zeros(ridge.d, dtype=DTYPE, requires_grad=True)}
    with pytest.raises(ValueError, match="memory_budget.*w_0 requires grad"):
        bilevel.solve(
            ridge.inner, w0, ridge.hparams(), bilevel.sgd(lr=LR), T, "auto", memory_budget=budget
        )
    # with room for reverse mode, the solve node gives w_0 its gradient as reverse mode does
    grads = {}
    for method, options in (("auto", {"memory_budget": 1e9}), ("reverse", {})):
        w = bilevel.solve(
            ridge.inner, w0, ridge.hparams(), bilevel.sgd(lr=LR), 20, method, **options
        )
        grads[method] = torch.autograd.grad(ridge.outer(w, None), w0["w"])[0]
    torch.testing.assert_close(grads["auto"], grads["reverse"], rtol=0, atol=0)
    with torch.no_grad():  # meta-test: the measurement still works, the run keeps no graph
        w = bilevel.solve(ridge.inner, w0, ridge.hparams(), bilevel.sgd(lr=LR), 20, "auto")
    torch.testing.assert_close(
        w["w"],
        bilevel.solve(ridge.inner, w0, ridge.hparams(), bilevel.sgd(lr=LR), 20)["w"].detach(),
    )


@pytest.mark.parametrize("budget,method", [(1e9, "reverse"), (None, "forward")])
def test_the_registered_method_runs_the_choice_and_reports_it(budget, method):
    """METHODS["auto"] is a method like the others (Problem.create resolves it beforehand)."""
    ridge, T = Ridge(), 500
    budget = budget or forward_budget(ridge, T)[1]
    lam = {"gamma": ridge.gamma.detach().requires_grad_(True)}
    inner = bilevel.Problem.create(
        ridge.inner, ridge.outer, ridge.params(), lam, bilevel.sgd(lr=LR), T
    ).inner
    solution = bilevel.METHODS["auto"](inner, ridge.params(), lam, T, memory_budget=budget)
    assert solution.info["auto"]["method"] == method
    w_T = solution.params["w"].detach().requires_grad_(True)
    (adjoint,) = torch.autograd.grad(ridge.outer({"w": w_T}, None), w_T)
    grads, _ = solution.vjp({"w": adjoint})
    assert relative_error(grads["gamma"], ridge.exact_T(T, LR)[1]) < 1e-10


def test_too_many_hyperparameters_for_forward_mode_is_an_error_that_says_why():
    ridge = Ridge(d=MAX_FORWARD_HPARAMS + 1)
    _, budget = forward_budget(ridge, 500, "forward-loop")
    with pytest.raises(ValueError) as error:
        ridge_problem(ridge, 500, memory_budget=budget)
    message = str(error.value)
    assert f"m={MAX_FORWARD_HPARAMS + 1} scalar hyperparameters" in message
    assert "method='forward'" in message and "memory_budget=" in message


def test_nothing_fits_names_the_budget_and_the_smallest_estimate():
    ridge = Ridge()
    with pytest.raises(ValueError) as error:
        ridge_problem(ridge, 50, memory_budget=1000)
    message = str(error.value)
    assert "memory_budget=0.0 MiB" in message and "smallest reverse-mode estimate" in message
    assert "truncated" in message and "forward mode needs" in message


@pytest.mark.parametrize("budget", [0, -1e6, float("nan"), float("inf"), True, "50MB"])
def test_bad_budgets_are_named(budget):
    with pytest.raises(ValueError, match=r"memory_budget must be a number of bytes > 0"):
        ridge_problem(Ridge(), 10, memory_budget=budget)


def test_options_of_other_methods_are_refused():
    with pytest.raises(TypeError, match="'memory' for method 'auto'; it accepts: memory_budget"):
        ridge_problem(Ridge(), 10, memory="graph")


def test_default_budget_is_half_the_available_memory():
    decision = ridge_problem(Ridge(), 10).auto
    assert decision["budget_source"].startswith("half of ")
    if os.path.exists("/proc/meminfo"):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert 0 < decision["memory_budget"] <= total / 2


def test_the_measurement_counts_per_step_tensors_and_not_the_data():
    """A large data matrix saved by every step is counted once (not per step); a minibatch
    copied out of it in every step is counted per step."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20000, 50, generator=g, dtype=DTYPE), torch.randn(20000, dtype=DTYPE)
    rows = torch.randperm(20000, generator=g)[:5000]
    params = {"w": torch.zeros(50, dtype=DTYPE)}
    hparams = {"log_l2": torch.tensor(-2.0, dtype=DTYPE, requires_grad=True)}

    def step_graph(features):
        def inner(p, h):
            return ((features() @ p["w"] - y[: len(features())]) ** 2).mean() + h[
                "log_l2"
            ].exp() * (p["w"] ** 2).sum()

        problem = bilevel.Problem.create(
            inner, None, params, hparams, bilevel.sgd(lr=0.1), 10, "auto", require_grad=False
        )
        return problem.auto["sizes"]["step_graph"]

    data_bytes = X.numel() * X.element_size()  # 8 MB
    assert step_graph(lambda: X) < data_bytes / 20  # the residuals only
    assert step_graph(lambda: X[rows]) >= rows.numel() * 50 * 8  # the copied minibatch


def test_the_measurement_leaves_the_random_stream_alone():
    """auto's measuring steps draw dropout masks; the generators are restored after, so the
    run sees the masks an explicit method sees from the same seed."""
    inner, outer, params, hparams = dropout_problem()
    torch.manual_seed(7)
    reference = unrolled_by_autograd(inner, outer, params, hparams, 0.2, 12)
    torch.manual_seed(7)
    result = bilevel.hypergradient(
        inner, outer, params, hparams, bilevel.sgd(lr=0.2), 12, "auto", memory_budget=1e9
    )
    torch.testing.assert_close(result.grads["log_decay"], reference, rtol=1e-10, atol=0)


@pytest.mark.e2e
def test_check_and_hyperoptimizer_accept_auto():
    mlp = SmallMLP()
    report = bilevel.check(
        mlp.inner, mlp.outer, mlp.w0, mlp.hparams(), mlp.dynamics("momentum"), 30, "auto",
        memory_budget=2e6,
    )  # fmt: skip
    assert report.passed(1e-6), report
    hparams = mlp.hparams()
    loop = bilevel.HyperOptimizer(
        mlp.inner, mlp.outer, mlp.w0, hparams, mlp.dynamics("momentum"), 30,
        torch.optim.SGD(hparams.values(), lr=0.01), method="auto", memory_budget=2e6,
    )  # fmt: skip
    assert loop.problem.method == "reverse"  # resolved once, when the loop was built
    metrics = loop.run(2)
    assert metrics[-1]["auto"] == loop.problem.auto


def test_methods_command_lists_auto_and_its_option():
    from click.testing import CliRunner

    from bilevel.app.cli import main

    output = CliRunner().invoke(main, ["methods"]).output
    assert "auto" in output and "memory_budget=None" in output


def test_forward_estimate_grows_with_m_and_not_with_T():
    sizes = dict(
        step_graph=1000, saved_tensors=10, activations=500, state=800, random_state=5056, itemsize=8
    )
    short = Sizes(hparams=3, steps=10, **sizes)
    assert forward_bytes(short, True) == forward_bytes(Sizes(hparams=3, steps=10**6, **sizes), True)
    assert forward_bytes(Sizes(hparams=6, steps=10, **sizes), True) > forward_bytes(short, True)
    assert segment_bytes(short, 10) == 12.5 * short.per_step  # one segment: the whole graph


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import bilevel

    torch.set_num_threads(1)
    method, budget = sys.argv[1], float(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 8, generator=g, dtype=torch.float64)
    y = torch.randn(512, generator=g, dtype=torch.float64)

    def inner(p, h):
        hidden = torch.tanh(X @ p["W"])
        return ((hidden @ p["v"] - y) ** 2).mean() + h["log_l2"].exp() * (p["W"] ** 2).sum()

    def outer(p, h):
        return ((torch.tanh(X @ p["W"]) @ p["v"] - y) ** 2).mean()

    params = {"W": 0.1 * torch.randn(8, 128, generator=g, dtype=torch.float64),
              "v": torch.zeros(128, dtype=torch.float64)}
    hparams = {"log_l2": torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)}
    options = {"memory": "graph"} if method == "reverse" else {"memory_budget": budget}
    run = lambda T: bilevel.hypergradient(
        inner, outer, params, hparams, bilevel.sgd(lr=0.05, momentum=0.5), T, method, **options)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    run(3)  # the first call's one-off allocations are not the method's
    baseline = status("VmRSS")
    result = run(300)
    print(json.dumps({"extra": status("VmHWM") - baseline, "auto": result.info.get("auto")}))
    """
)


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")
def test_auto_stays_under_its_budget_where_the_graph_does_not():
    """Peak resident memory of a fresh process, above its level before the run: graph ~330 MB,
    auto under 50 MB. glibc is told to return freed memory (fixed mmap and trim thresholds):
    by default it keeps up to 64 MB of freed heap, which is the allocator's cache, not
    memory the method holds."""
    budget = 50e6
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

    def peak(method):
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, method, str(budget)],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    graph, auto = peak("reverse"), peak("auto")
    estimates = auto["auto"]["estimates"]
    assert graph["extra"] > 300e6 > budget  # the graph alone would break the budget ...
    assert auto["auto"]["options"]["memory"] == "checkpoint"
    assert auto["extra"] <= budget  # ... and auto holds to it
    assert 0.7 < estimates["graph"] / graph["extra"] < 1.6  # the measured graph is the real one
