"""The README's example runs exactly as written, and its commands are the ones CI runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_example_runs():
    (example,) = re.findall(r"```python\n(.*?)```", README, re.S)
    run = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    assert "relative error" in run.stdout


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = blocks[-1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
