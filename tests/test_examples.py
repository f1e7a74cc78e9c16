"""Every example runs as written (with --quick) and improves what it says it improves."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NUMBER = r"([-+0-9.e]+)"


def run_example(name: str) -> str:
    """The example's standard output after `python examples/<name> --quick`, run in a fresh
    interpreter that imports this checkout's bilevel first."""
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr  # an inexact solve would warn
    return run.stdout


def numbers(pattern: str, text: str) -> list[float]:
    """The numbers captured by `pattern` (NUMBER marks them) in the one line it matches."""
    match = re.search(pattern.replace("NUMBER", NUMBER), text)
    assert match, f"no line matches {pattern!r} in:\n{text}"
    return [float(group) for group in match.groups()]


def test_every_example_is_tested_and_listed():
    scripts = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    tested = sorted(re.findall(r'run_example\("(\d\d_\w+\.py)"\)', Path(__file__).read_text()))
    assert scripts == tested
    table = (EXAMPLES / "README.md").read_text()
    assert all(f"({name})" in table for name in scripts)


@pytest.mark.e2e
def test_per_layer_weight_decay_lowers_validation_and_test_loss():
    out = run_example("01_per_layer_weight_decay.py")
    before, after = numbers(r"validation loss: before NUMBER, after NUMBER", out)
    assert after < 0.9 * before
    before, after = numbers(r"test loss: before NUMBER, after NUMBER", out)
    assert after < before


@pytest.mark.e2e
def test_real_time_schedule_beats_the_fixed_settings():
    out = run_example("02_real_time_lr_momentum.py")
    fixed, tuned = numbers(r"validation loss: fixed NUMBER, tuned NUMBER", out)
    assert tuned < 0.95 * fixed
    schedule = re.findall(rf"^ +\d+: {NUMBER}, {NUMBER}$", out, re.MULTILINE)
    (start_lr,) = numbers(r"fixed: lr NUMBER,", out)
    assert float(schedule[-1][0]) > start_lr  # the timid start was raised during the run


@pytest.mark.e2e
def test_maml_variants_all_beat_no_meta_learning_on_held_out_tasks():
    out = run_example("03_maml_linear_regression.py")
    (baseline,) = numbers(r"theta = 0 \(no meta-learning\): NUMBER", out)
    for method in ("maml", "fomaml", "imaml"):
        (loss,) = numbers(rf"  {method}: NUMBER", out)
        assert loss < 0.5 * baseline, method


@pytest.mark.e2e
def test_reweighting_down_weights_the_corrupted_examples():
    out = run_example("04_data_reweighting.py")
    caught, corrupted = numbers(r"corrupted examples with weight < 0.5: NUMBER of NUMBER", out)
    wrongly, clean = numbers(r"clean examples with weight < 0.5: NUMBER of NUMBER", out)
    assert caught > 0.8 * corrupted
    assert wrongly < 0.1 * clean
    before, after = numbers(r"test accuracy: before NUMBER, after NUMBER", out)
    assert after > before


@pytest.mark.e2e
def test_hyper_representation_raises_query_accuracy():
    out = run_example("05_hyper_representation.py")
    before, after = numbers(r"query accuracy: before NUMBER, after NUMBER", out)
    (raw,) = numbers(r"heads on the raw inputs: NUMBER", out)
    assert after > before + 0.3
    assert after > raw + 0.2


@pytest.mark.e2e
def test_custom_solvers_agree_with_finite_differences():
    out = run_example("06_implicit_custom_solvers.py")
    for solver in ("custom_argmin", "custom_fixed_point"):
        (error,) = numbers(rf"{solver} around [\w. -]+: relative error NUMBER", out)
        assert error < 1e-6, solver
    (active,) = numbers(r"box-constrained solution: NUMBER of", out)
    assert active > 0  # the check covers binding constraints
