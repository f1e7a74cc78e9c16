import subprocess
import sys

import bilevel


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and bilevel.__version__ in out.stdout
    out = run("--help")
    assert out.returncode == 0 and "bilevel programming" in out.stdout


def test_methods_lists_every_method_with_its_options():
    out = run("methods")
    assert out.returncode == 0
    for name in bilevel.METHODS:
        assert name in out.stdout
    assert "memory='graph'" in out.stdout


def test_unknown_command_is_an_error():
    out = run("frobnicate")
    assert out.returncode != 0 and "No such command" in out.stderr
