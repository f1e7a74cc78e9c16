"""`bilevel` as users run it, in a process of its own: version, help, methods, a typo."""

import pytest

import bilevel
from tests.conftest import bilevel_command

pytestmark = pytest.mark.e2e


def run(*args):
    return bilevel_command(*args, timeout=120)


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
