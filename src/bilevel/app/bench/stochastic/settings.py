"""Every solver's settings on every problem, in one place.

A solver gets COMMON[key], the settings every solver shares (steps and batch sizes; the key is
the problem's name, one key for all the cleaning problems), only those it accepts, updated by
TUNED[solver][key]. A solver registered in bilevel.stochastic.SOLVERS but absent from TUNED
runs with COMMON alone and is marked "untuned" in the table; one that needs a setting COMMON
does not give fails with a row that names it. Budgets are in samples drawn (inner and outer
together), so solvers that draw more per iteration make fewer iterations.

How TUNED was chosen: per solver and key, a grid of inner_step x outer_step x (constant or
decreasing steps, k^-0.4 and k^-0.6), two seeds at the quick size and budget, keeping the
setting with the best median final metric (lowest suboptimality, highest test accuracy); the
grids are in docs/stochastic.md.
"""

from __future__ import annotations

from bilevel import stochastic

# what most tuned solvers chose: the settings of a solver that has no TUNED row yet
COMMON = {
    "quadratic": {"inner_step": 0.8, "outer_step": 0.3, "inner_batch": 16, "outer_batch": 16},
    "ijcnn1": {"inner_step": 1.0, "outer_step": 30.0, "inner_batch": 32, "outer_batch": 32},
    "covtype": {"inner_step": 0.5, "outer_step": 3.0, "inner_batch": 32, "outer_batch": 32},
    "cleaning": {"inner_step": 0.1, "outer_step": 100.0, "inner_batch": 32, "outer_batch": 32},
}

DECREASING = {"inner_decay": 0.4, "outer_decay": 0.6}  # k^-0.4 and k^-0.6

# chosen on 2026-12-04 at the quick size (grids and medians in docs/stochastic.md)
TUNED: dict[str, dict[str, dict]] = {
    "soba": {
        "quadratic": {"inner_step": 0.8, "outer_step": 0.1},
        "ijcnn1": {"inner_step": 1.0, "outer_step": 30.0},  # 100 diverged on one seed of two
        "covtype": {"inner_step": 0.5, "outer_step": 3.0},
        "cleaning": {"inner_step": 0.1, "outer_step": 100.0},
    },
    "ma-soba": {
        "quadratic": {"inner_step": 0.4, "outer_step": 0.1},
        "ijcnn1": {"inner_step": 1.0, "outer_step": 30.0},  # 100 diverged on one seed of two
        "covtype": {"inner_step": 0.5, "outer_step": 3.0},
        "cleaning": {"inner_step": 0.1, "outer_step": 100.0},
    },
    "saba": {
        "quadratic": {"inner_step": 0.8, "outer_step": 0.3},
        "ijcnn1": {"inner_step": 1.0, "outer_step": 100.0},  # 300 diverged on one seed of two
        "covtype": {"inner_step": 0.5, "outer_step": 3.0},
        "cleaning": {"inner_step": 0.1, "outer_step": 100.0},
    },
    "amigo": {
        "quadratic": {"inner_step": 0.8, "outer_step": 1.0, **DECREASING},
        "ijcnn1": {"inner_step": 1.0, "outer_step": 100.0},
        "covtype": {"inner_step": 0.5, "outer_step": 30.0},
        "cleaning": {"inner_step": 0.05, "outer_step": 100.0},
    },
    "stocbio": {
        "quadratic": {"inner_step": 0.8, "outer_step": 3.0, **DECREASING},
        "ijcnn1": {"inner_step": 1.0, "outer_step": 100.0},
        "covtype": {"inner_step": 0.25, "outer_step": 100.0},  # 0.5: diverged on one seed
        "cleaning": {"inner_step": 0.05, "outer_step": 100.0},
    },
}

# samples drawn per run, per mode and kind, and the most seconds one run may take
BUDGET = {
    "quick": {"quadratic": 10_000, "ijcnn1": 20_000, "covtype": 20_000, "cleaning": 20_000},
    "full": {"quadratic": 200_000, "ijcnn1": 2_000_000, "covtype": 4_000_000,
             "cleaning": 1_000_000},
}  # fmt: skip
MAX_SECONDS = {"quick": 3.0, "full": 600.0}
EVALUATIONS = {"quick": 12, "full": 30}  # log-spaced in samples


def settings_for(solver: str, key: str) -> tuple[dict, bool]:
    """(the settings `solver` runs with on the problems of `key` (BenchProblem.settings_key),
    whether they were tuned there)."""
    accepted, _ = stochastic.SOLVERS[solver].accepted_settings()
    common = {k: v for k, v in COMMON[key].items() if k in accepted}
    tuned = TUNED.get(solver, {}).get(key)
    return {**common, **(tuned or {})}, tuned is not None
