"""The convergence experiment (impact of T) end to end on real Omniglot, tiny; its hypergradients
checked against finite differences in float64."""

import json

import pytest
import torch

import bilevel
from bilevel.app.experiments.common import seed_everything
from bilevel.app.experiments.config import ConfigError, resolve
from bilevel.app.experiments.convergence import (
    PRESETS,
    ConvergenceConfig,
    exact_solver,
    initial_representation,
    make_data,
    problem,
    zero_classifier,
)
from tests.conftest import DATA, bilevel_command, needs_omniglot

TINY = {
    "classes": 5,
    "features": 8,
    "radius": 4.0,
    "horizons": [1, 5],
    "hyper_iterations": 3,
    "hyper_lr": 0.01,
}

pytestmark = needs_omniglot


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    settings = [f"--set={key}={json.dumps(value)}" for key, value in TINY.items()]
    result = bilevel_command(
        "convergence", "--preset", "quick", *settings,
        "--quiet", "--data-dir", DATA, "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.e2e
def test_run_writes_rows_plots_and_representations(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [row["run"] for row in summary["rows"]] == ["T=1", "T=5", "exact"]
    for row in summary["rows"]:
        assert 0 <= row["test_accuracy"] <= 1 and row["f"] > 0 and row["seconds"] > 0
        assert row["inner_gradient_norm"] <= 1e-5  # evaluated at w_lambda, solved to tolerance
    assert "f_T" in summary["rows"][0] and "f_T" not in summary["rows"][2]
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["run"] for line in lines] == ["T=1"] * 3 + ["T=5"] * 3 + ["exact"] * 3
    assert all(line["inner_gradient_norm"] <= 1e-5 for line in lines if line["run"] == "exact")
    for plot in ("outer_objective.png", "accuracy.png", "outer_loss.png"):
        assert (tiny_run / plot).read_bytes()[:4] == b"\x89PNG"
    saved = torch.load(tiny_run / "representations.pt")
    assert set(saved) == {"initial", "T=1", "T=5", "exact"}
    assert all(float(r.norm()) <= TINY["radius"] * (1 + 1e-6) for r in saved.values())


@pytest.mark.e2e
def test_reported_f_is_the_validation_loss_at_the_exact_inner_solution(tiny_run):
    """Recompute f(lambda_T) and f_T(lambda_T) independently: 3000 plain gradient steps
    contract the distance to w_lambda by (1 - lr l2)^3000 < 1e-13."""
    resolved = json.loads((tiny_run / "config.json").read_text())["config"]
    config = ConvergenceConfig(**resolved)
    data = make_data(config, DATA, seed_everything(config.seed))
    inner, outer = problem(data, config.l2)
    saved = torch.load(tiny_run / "representations.pt")
    summary = json.loads((tiny_run / "summary.json").read_text())
    for row in summary["rows"]:
        hparams = {"representation": saved[row["run"]]}
        start = zero_classifier(config, data["train_x"])
        gd = bilevel.sgd(lr=config.inner_lr)
        converged = bilevel.solve(inner, start, hparams, gd, 3000)
        assert float(outer(converged, hparams)) == pytest.approx(row["f"], rel=1e-4)
        if row["T"] is not None:
            w_T = bilevel.solve(inner, start, hparams, gd, row["T"])
            assert float(outer(w_T, hparams)) == pytest.approx(row["f_T"], rel=1e-5)


@pytest.fixture(scope="module")
def tiny_problem():
    """5 classes, 4 features, float64: inner, outer, lambda, config, data."""
    config = ConvergenceConfig(
        classes=5, features=4, radius=2.0, l2=0.1, dtype="float64", exact_tolerance=1e-12
    )
    generator = seed_everything(0)
    data = make_data(config, DATA, generator)
    representation = initial_representation(config, generator).requires_grad_(True)
    inner, outer = problem(data, config.l2)
    return inner, outer, {"representation": representation}, config, data


def test_implicit_hypergradient_at_the_exact_solution_matches_finite_differences(tiny_problem):
    """The exact run's hypergradient against central differences of f itself (each side solved
    to |grad L| <= 1e-12)."""
    inner, outer, hparams, config, data = tiny_problem
    solver = exact_solver(config, data, inner)
    report = bilevel.check(
        inner, outer, solver, hparams, bilevel.sgd(lr=config.inner_lr), 1, "implicit-cg",
        directions=4, eps=1e-4, tolerance=1e-13, iterations=500,
    )  # fmt: skip
    assert solver.gradient_norm <= 1e-12
    assert report.passed(1e-6), str(report)


def test_reverse_hypergradient_for_T_5_matches_finite_differences(tiny_problem):
    inner, outer, hparams, config, data = tiny_problem
    report = bilevel.check(
        inner, outer, zero_classifier(config, data["train_x"]), hparams,
        bilevel.sgd(lr=config.inner_lr), 5, "reverse", directions=4, memory="graph",
    )  # fmt: skip
    assert report.passed(1e-6), str(report)


def test_presets_are_valid():
    for name in PRESETS:
        resolve(ConvergenceConfig, PRESETS, name)


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("horizons=[0, 5]", "every T must be a positive integer"),
        ("horizons=[5, 5]", "must be distinct"),
        ("test_shots=15", "exceeds the 20 drawings"),
        ("classes=2000", "classes: Input should be less than or equal to 1623"),
        ("l2=0", "l2: Input should be greater than 0"),
    ],
)
def test_bad_configuration_names_the_setting(assignment, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        resolve(ConvergenceConfig, PRESETS, "paper", assignments=[assignment])
