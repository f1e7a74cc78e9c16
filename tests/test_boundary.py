"""The boundary between the engine (`pip install bilevel`: torch and numpy) and the application
(`bilevel.app`, the `experiments` extra): the engine imports nothing of the application's, the
application uses the engine's public API, and each install gives what it promises."""

import ast
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import bilevel
from bilevel.app import EXTRA_MODULES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the experiments extra brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "bilevel"
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


@pytest.mark.e2e
@pytest.mark.parametrize("entry", ENTRIES)
def test_without_the_extra_the_command_line_says_what_to_install(entry):
    result = run_without(["click", "yaml"], ENTRIES[entry], "--help")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "missing: click, pyyaml" in line
    assert line.endswith("pip install 'bilevel[experiments]'")


@pytest.mark.e2e
@pytest.mark.parametrize("entry", ENTRIES)
def test_with_the_extra_both_entries_run_the_command_line(entry):
    result = run_without([], ENTRIES[entry], "--help")
    assert result.returncode == 0, result.stderr
    assert "hyperclean" in result.stdout and "fewshot" in result.stdout


# the application's packages, as imported (pillow is PIL, pyyaml is yaml)
APPLICATION_PACKAGES = {"click", "pydantic", "tqdm", "matplotlib", "PIL", "psutil", "yaml"}

# One hypergradient through the public API, against its closed form: gradient descent with step
# 1/2 on 0.5 |w - lam|^2 from w = 0 gives w_T = lam (1 - 2^-T), so the hypergradient of
# 0.5 |w_T - c|^2 is (w_T - c)(1 - 2^-T).
ENGINE_ONLY = """
import json, sys
import numpy, torch  # loaded first: only what bilevel adds to them counts
before = set(sys.modules)
import bilevel
lam = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
c = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
result = bilevel.hypergradient(
    lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
    lambda p, h: 0.5 * ((p["w"] - c) ** 2).sum(),
    {"w": torch.zeros(3, dtype=torch.float64)}, {"lam": lam},
    dynamics=bilevel.sgd(lr=0.5), steps=3,
)
shrink = 1 - 0.5**3
expected = (lam.detach() * shrink - c) * shrink
error = (result.grads["lam"] - expected).abs().max().item()
print(json.dumps({"error": error, "added": sorted(set(sys.modules) - before)}))
"""


@pytest.mark.e2e
def test_import_bilevel_loads_nothing_of_the_application():
    run = subprocess.run(
        [sys.executable, "-c", ENGINE_ONLY], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["error"] < 1e-12
    added = report["added"]
    assert "bilevel.hypergrad" in added  # the engine did run in this process
    # torch itself may import tqdm (torch.hub, when installed): only what bilevel adds counts;
    # the static test below rules out any import of these in the engine's source
    assert sorted({m.split(".")[0] for m in added} & APPLICATION_PACKAGES) == []
    assert [m for m in added if m == "bilevel.app" or m.startswith("bilevel.app.")] == []


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool):
    """Every module an import statement in `source` names, relative ones made absolute, with its
    line: `from pkg import name` yields pkg and pkg.name (name may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if node.module:
                yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def is_application(name: str) -> bool:
    return name == "bilevel.app" or name.startswith("bilevel.app.")


def engine_violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What a module of the engine must not import: the application (bilevel.app), or any
    package outside the standard library, torch, numpy and bilevel itself. The launcher
    bilevel.__main__ is not part of the engine (`import bilevel` never runs it) and may import
    the application."""
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy", "bilevel"}
    found = []
    for name, line in imported_modules(source, module, is_package):
        application = is_application(name) and module != "bilevel.__main__"
        if application or name.split(".")[0] not in allowed:
            found.append(f"{module}:{line} imports {name}")
    return found


ENGINE = sorted(path for path in SOURCE.rglob("*.py") if (SOURCE / "app") not in path.parents)


def test_the_engine_imports_neither_the_application_nor_other_packages():
    assert len(ENGINE) > 10 and SOURCE / "hypergrad" / "reverse.py" in ENGINE
    found = [
        violation
        for path in ENGINE
        for violation in engine_violations(
            path.read_text(), module_name(path), path.name == "__init__.py"
        )
    ]
    assert found == []


@pytest.mark.parametrize(
    "source, module, is_package",
    [
        ("import click", "bilevel.solve", False),
        ("def f():\n    from matplotlib import pyplot", "bilevel.check", False),
        ("from .app import cli", "bilevel.solve", False),
        ("from . import app", "bilevel", True),
        ("from ..app.data import load_mnist", "bilevel.hypergrad.reverse", False),
        ("from bilevel.app import runs", "bilevel.outer", False),
        ("import bilevel.app.cli", "bilevel.nn", False),
    ],
)
def test_the_static_check_catches_each_kind_of_forbidden_import(source, module, is_package):
    assert len(engine_violations(source, module, is_package)) >= 1


def test_the_static_check_allows_what_the_engine_may_import():
    source = "import math\nimport torch.func\nimport numpy as np\nfrom .hypergrad import linear"
    assert engine_violations(source, "bilevel.solve") == []
    assert engine_violations("from bilevel.app.cli import main", "bilevel.__main__") == []


def test_the_application_uses_only_the_public_api_of_the_engine():
    public = set(bilevel.__all__) | {"__version__"}
    found = []
    for path in sorted((SOURCE / "app").rglob("*.py")):
        module = module_name(path)
        for name, line in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            engine_part = name.split(".")[1] if name.startswith("bilevel.") else None
            if engine_part and engine_part != "app" and engine_part not in public:
                found.append(f"{module}:{line} imports {name}")
    assert found == []


@pytest.mark.e2e
def test_python_m_bilevel_runs_the_command_line():
    run = subprocess.run(
        [sys.executable, "-m", "bilevel", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Usage: python -m bilevel")
    for command in ("hyperclean", "hparams", "convergence", "fewshot", "bench", "methods"):
        assert command in run.stdout


def test_the_public_namespace_holds_only_the_public_api():
    """Every public name of `bilevel` is in __all__, or is one of its own submodules (Python sets
    those on the package when they are imported): nothing leaks from __init__.py's imports."""
    leaked = sorted(
        name
        for name, value in vars(bilevel).items()
        if not name.startswith("_")
        and name not in bilevel.__all__
        and not (isinstance(value, types.ModuleType) and value.__name__ == f"bilevel.{name}")
    )
    assert leaked == []
    assert [name for name in bilevel.__all__ if not hasattr(bilevel, name)] == []
