"""The hparams experiment end to end on real MNIST, tiny; and its hypergradient, checked."""

import json
import re

import pytest
import torch

import bilevel
from bilevel.app.experiments import hparams
from bilevel.app.experiments.config import ConfigError, resolve
from tests.conftest import DATA, needs_mnist
from tests.conftest import bilevel_command as bilevel_cli

TINY = [
    "--preset",
    "quick",
    *("--set", "train=500", "--set", "validation=300", "--set", "test=500"),
    *("--set", "hidden=32", "--set", "inner_steps=10", "--set", "hyper_iterations=2"),
    *("--set", "every=5", "--set", "curve_points=2"),
    "--quiet",
]
MODES = ["restart", "real-time", "warm"]

pytestmark = needs_mnist


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hparams")
    result = bilevel_cli("hparams", *TINY, "--data-dir", DATA, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.e2e
def test_run_writes_config_metrics_summary_and_plots(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["experiment"] == "hparams" and config["config"]["inner_steps"] == 10
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [row["mode"] for row in summary["rows"]] == MODES
    for row in summary["rows"]:
        assert row["status"] == "completed" and row["seconds"] > 0
        assert {"lr", "momentum", "weight_decay", "val_loss", "test_accuracy"} <= set(row)
        assert 0 < row["momentum"] < 1 and 0 <= row["test_accuracy"] <= 1
        assert row["cpu_seconds"] > 0 and row["random_trials"] >= 0
        assert {"random", "random_equal_cpu", "random_trials_equal_cpu"} <= set(row)
    assert [row["updates"] for row in summary["rows"]] == [2, 4, 2]  # real time: 2 * 10 / 5
    search = summary["random_search"]
    assert search["trials"] >= 1 and search["best"]["val_loss"] > 0
    assert set(summary["curves"]) == set(MODES)
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    by_mode = {mode: [m for m in lines if m["mode"] == mode] for mode in [*MODES, "random"]}
    assert [len(by_mode[mode]) for mode in MODES] == [2, 4, 2]
    assert len(by_mode["random"]) == search["trials"]
    for line in lines[: 2 + 4 + 2]:
        assert {"outer_loss", "hypergradient_norm", "lr", "momentum", "weight_decay"} <= set(line)
    assert [m["inner_step"] for m in by_mode["real-time"]] == [5, 10, 15, 20]
    for plot in ("hyperparameters.png", "validation_loss.png", "wall_time.png"):
        assert (tiny_run / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_diverging_modes_are_reported_not_fatal(tmp_path):
    # lr * weight decay = 1e4: the weights grow 1e4-fold a step and overflow within T steps
    diverge = ["--set", "init_lr=1", "--set", "init_weight_decay=1e4"]
    result = bilevel_cli("hparams", *TINY, *diverge, "--data-dir", DATA, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["initial"]["val_loss"] is None
    for row in summary["rows"]:
        assert row["status"].startswith("diverged at update 1") and row["updates"] == 0
        assert row["val_loss"] is None and row["test_accuracy"] is None
    assert (tmp_path / "wall_time.png").exists()


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("modes=[sideways]", "modes.0: Input should be"),
        ("modes=[warm, warm]", "each mode at most once"),
        ("lr_range=[1, 0.1]", "lr_range: expected [low, high] with low < high"),
        ("momentum_range=[0, 1]", "momentum_range must lie in [0, 1)"),
        ("real_time_steps=5", "every=10 exceeds real_time_steps=5"),
        ("batch_size=3000", "batch_size=3000 exceeds train=2000"),
        ("init_momentum=1", "init_momentum: Input should be less than 1"),
        ("learning_rate=1", "unknown setting 'learning_rate'"),
    ],
)
def test_bad_configuration_names_the_setting(assignment, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(hparams.HparamsConfig, hparams.PRESETS, "quick", None, [assignment])


@pytest.mark.e2e
def test_bad_configuration_is_one_line_and_exit_code_2(tmp_path):
    result = bilevel_cli("hparams", "--preset", "quick", "--set", "every=0", "--out", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert errors == ["Error: invalid configuration: every: Input should be greater than 0 (got 0)"]
    assert not any(tmp_path.iterdir())


def test_forward_hypergradient_of_the_experiment_matches_finite_differences():
    """The experiment's own minibatch objective and dynamics, tiny and in float64."""
    torch.set_num_threads(1)
    config = hparams.HparamsConfig(
        train=20, validation=10, test=10, hidden=4, batch_size=5, inner_steps=6
    )
    generator = torch.Generator().manual_seed(0)
    data = hparams.make_data(config, DATA, generator)
    data = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
    params, apply = hparams.make_model(config.hidden, "cpu", torch.float64)
    batches = hparams.minibatches(config.train, config.batch_size, config.inner_steps, generator)
    inner, outer = hparams.objectives(data, apply, batches)
    lam = hparams.unconstrained(0.3, 0.8, 1e-2, "cpu", torch.float64)
    report = bilevel.check(
        inner, outer, params, lam, hparams.dynamics(), config.inner_steps, method="forward"
    )
    assert report.passed(1e-6), report
    assert float(report.numeric.abs().min()) > 1e-6  # every hyperparameter matters here
