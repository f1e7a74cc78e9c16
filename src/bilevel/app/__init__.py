"""The application built on the engine: command line, experiments, data sets, models, runs,
checkpoints, distributed helpers and benchmarks (`pip install 'bilevel[experiments]'`).

The engine (``bilevel``) never imports this package; the application uses the engine's public
API as users do. This module itself imports nothing outside the standard library, so the command
line can say what is missing before it imports the rest.
"""

import sys
from importlib.util import find_spec

#: The `experiments` extra of pyproject.toml: each distribution and the module it provides.
EXTRA_MODULES = {
    "click": "click",
    "pydantic": "pydantic",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "pillow": "PIL",
    "psutil": "psutil",
    "pyyaml": "yaml",
    "tomli": "tomli",  # only where the standard library has no tomllib (Python < 3.11)
}

INSTALL_HINT = "pip install 'bilevel[experiments]'"


def missing_requirements() -> list[str]:
    """The distributions of the `experiments` extra that cannot be imported here.

    Returns:
        Their names as pip knows them (e.g. ``pyyaml``), in the order of the extra; empty when
        the application can run.
    """
    needed = {
        name: module
        for name, module in EXTRA_MODULES.items()
        if name != "tomli" or sys.version_info < (3, 11)
    }
    return [name for name, module in needed.items() if find_spec(module) is None]
