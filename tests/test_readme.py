"""The README's example runs exactly as written, and its commands are the ones CI runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def run_example(number: int) -> str:
    examples = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(examples) == 2
    run = subprocess.run(
        [sys.executable, "-c", examples[number]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.e2e
def test_readme_example_runs():
    assert "relative error" in run_example(0)


@pytest.mark.e2e
def test_readme_solver_example_agrees_with_finite_differences():
    implicit, numeric = map(float, re.findall(r"[-+]?\d\.\d+e[-+]\d+", run_example(1)))
    assert abs(implicit) > 1e-4
    assert abs(implicit - numeric) < 1e-6 * abs(implicit)


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = blocks[-1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
