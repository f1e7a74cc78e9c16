"""The boundary between the engine (`pip install bilevel`: torch and numpy) and the application
(`bilevel.app`, the `experiments` extra)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.app import EXTRA_MODULES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the experiments extra brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_names(requirements):
    return {re.match(r"[A-Za-z0-9_.\-\[\]]+", r).group().lower() for r in requirements}


def test_the_engine_needs_torch_and_numpy_and_dev_brings_the_application():
    assert requirement_names(PYPROJECT["dependencies"]) == {"torch", "numpy"}
    extras = PYPROJECT["optional-dependencies"]
    assert requirement_names(extras["experiments"]) == set(EXTRA_MODULES)
    assert "bilevel[experiments]" in extras["dev"]


def run_without(modules, entry, *args):
    """Run an entry point of the command line in a fresh interpreter where `modules` cannot be
    imported (a None entry in sys.modules is how Python marks a module as unimportable)."""
    block = "".join(f"sys.modules[{m!r}] = None; " for m in modules)
    code = f"import sys; {block}sys.argv = ['bilevel', *{list(args)!r}]; {entry}"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


SCRIPT = PYPROJECT["scripts"]["bilevel"]
ENTRIES = {
    # what pip's `bilevel` script does with the target pyproject.toml names
    "script": f"import pkgutil; sys.exit(pkgutil.resolve_name({SCRIPT!r})())",
    # what `python -m bilevel` does
    "python -m": "import runpy; runpy.run_module('bilevel', run_name='__main__', alter_sys=True)",
}


@pytest.mark.parametrize("entry", ENTRIES)
def test_without_the_extra_the_command_line_says_what_to_install(entry):
    result = run_without(["click", "yaml"], ENTRIES[entry], "--help")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "missing: click, pyyaml" in line
    assert line.endswith("pip install 'bilevel[experiments]'")


@pytest.mark.parametrize("entry", ENTRIES)
def test_with_the_extra_both_entries_run_the_command_line(entry):
    result = run_without([], ENTRIES[entry], "--help")
    assert result.returncode == 0, result.stderr
    assert "hyperclean" in result.stdout and "fewshot" in result.stdout
