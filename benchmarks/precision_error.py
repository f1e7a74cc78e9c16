"""Relative error of every method's hypergradient under mixed precision, against the same
method in float64, on tests/test_precision.py's MLP (tests.problems.SmallMLP in float32).

    PYTHONPATH=src python benchmarks/precision_error.py       # about 30 s on 2 cores

Rows: the cases of tests/test_precision.py (CASES at T = 30, IMPLICIT near the minimum);
columns: float32 without autocast, bilevel.Precision(torch.bfloat16) and
bilevel.Precision(torch.float16) (loss scale 2**10). A star marks an implicit solve that
stopped short of its tolerance (bilevel.SolverWarning).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

from tests.test_precision import CASES, IMPLICIT, NEAR_MINIMUM, error  # noqa: E402

COLUMNS = {"float32": None, "bf16": "bf16", "fp16": "fp16"}


def cell(method, options, precision, setting) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = error(method, options, precision, **setting)
    return f"{value:9.1e}" + ("*" if caught else " ")


def table(title: str, cases, setting: dict) -> None:
    print(f"\n{title}\n{'method':52s}" + "".join(f"{name:>10s}" for name in COLUMNS))
    for method, options in cases:
        label = method + "".join(f" {k}={v}" for k, v in options.items())
        cells = [cell(method, options, p, setting) for p in COLUMNS.values()]
        print(f"{label:52s}" + "".join(cells))


if __name__ == "__main__":
    table("T = 30", CASES, {})
    table(f"near the minimum: {NEAR_MINIMUM}", IMPLICIT, NEAR_MINIMUM)
