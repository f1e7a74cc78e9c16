"""The hyper-cleaning experiment end to end on real MNIST, small; and the CLI conventions."""

import json
import signal
import subprocess
import time

import pytest

from tests.conftest import DATA, needs_mnist, start_bilevel
from tests.conftest import bilevel_command as bilevel

TINY = [
    "--preset",
    "quick",
    "--set",
    "hyper_iterations=3",
    "--set",
    "inner_steps=20",
    "--set",
    "truncation=5",
    "--set",
    "retrain_steps=40",
    "--set",
    "compare_iterations=1",
    "--quiet",
]

pytestmark = [needs_mnist, pytest.mark.e2e]  # every test runs `bilevel` in its own process


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hyperclean")
    result = bilevel("hyperclean", *TINY, "--data-dir", DATA, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_run_writes_config_metrics_summary_and_plots(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["experiment"] == "hyperclean" and config["config"]["inner_steps"] == 20
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert 0.5 < summary["baseline"] <= 1 and 0.5 < summary["oracle"] <= 1
    (row,) = summary["rows"]
    assert {"radius", "dh", "dh_r", "f1", "precision", "recall"} <= set(row)
    assert [m["method"] for m in summary["methods"]] == ["reverse", "truncated", "implicit-cg"]
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 + 3  # the main run, then one iteration per compared method
    assert all({"outer_loss", "hypergradient_norm", "f1"} <= set(line) for line in lines)
    for plot in ("weights.png", "outer_loss.png"):
        assert (tiny_run / plot).read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_numbers(tiny_run, tmp_path):
    again = bilevel(
        "hyperclean", *TINY, "--data-dir", DATA, "--out", tmp_path, "--set", "compare_iterations=0"
    )
    assert again.returncode == 0, again.stderr
    first = json.loads((tiny_run / "summary.json").read_text())
    second = json.loads((tmp_path / "summary.json").read_text())
    assert first["rows"][0]["dh"] == second["rows"][0]["dh"]
    assert first["rows"][0]["f1"] == second["rows"][0]["f1"]


def test_interrupt_leaves_a_valid_partial_result(tmp_path):
    process = start_bilevel(
        "hyperclean", "--preset", "quick", "--quiet", "--data-dir", DATA, "--out", tmp_path,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 120
    while (
        not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").stat().st_size
    ):
        assert time.time() < deadline and process.poll() is None, process.stderr
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "interrupted" in stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "baseline" in summary


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "inner_steps=0"], "inner_steps: Input should be greater than 0"),
        (["--set", "nonsense=1"], "unknown setting 'nonsense'"),
        (["--set", "method=newton"], "method: Input should be"),
        (["--set", "corrupted=6000"], "corrupted=6000 exceeds train=5000"),
        (["--preset", "slow"], "Invalid value for '--preset'"),
        (["--config", "missing.toml"], "--config missing.toml: no such file"),
        (["--device", "tpu"], "device"),
    ],
)
def test_bad_configuration_is_one_clear_line(args, message, tmp_path):
    result = bilevel("hyperclean", *args, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_config_file_and_overrides_in_order(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("inner_steps = 77\nhyper_lr = 0.01\n")
    result = bilevel(
        "hyperclean",
        "--preset",
        "quick",
        "--config",
        config,
        "--set",
        "hyper_lr=0.02",
        "--seed",
        "5",
        "--show-config",
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["inner_steps"] == 77 and resolved["hyper_lr"] == 0.02
    assert resolved["seed"] == 5 and resolved["train"] == 1000  # from the preset


def test_missing_data_is_a_clear_error(tmp_path):
    result = bilevel(
        "hyperclean",
        *TINY,
        "--data-dir",
        tmp_path / "empty",
        "--out",
        tmp_path / "out",
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr
