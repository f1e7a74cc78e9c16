"""Stochastic bilevel solvers: single-loop and warm-started algorithms over minibatches.

    problem = bilevel.stochastic.StochasticProblem(inner, outer, x, z, n_inner, n_outer)
    solver = bilevel.stochastic.make("saba", problem, inner_step=0.5, outer_step=0.1,
                                     inner_batch=32, outer_batch=32)
    solver.run(1000); solver.x, solver.history

`inner(x, z, batch)` and `outer(x, z, batch)` are means over the sample indices in `batch`;
every solver moves x towards a minimiser of h(x) = F(x, z*(x)) using minibatch gradients and
Hessian- and Jacobian-vector products (autograd; no matrix is formed). `SOLVERS` names them.
"""

from __future__ import annotations

from .amigo import AmIGO
from .learning import DataCleaning, LogisticRegularisation, SoftmaxRegularisation
from .problem import Sampler, StochasticProblem
from .problems import QuadraticProblem
from .saba import SABA
from .soba import MASOBA, SOBA
from .solver import DivergenceError, StochasticSolver
from .stocbio import StocBiO

SOLVERS: dict[str, type[StochasticSolver]] = {
    solver.name: solver for solver in (SOBA, MASOBA, SABA, AmIGO, StocBiO)
}


def make(name: str, problem: StochasticProblem, **settings) -> StochasticSolver:
    """The solver registered as `name` in SOLVERS, built on `problem` with `settings`.

    Args:
        name: one of SOLVERS ("soba", "ma-soba", "saba", "amigo", "stocbio").
        problem: a StochasticProblem.
        **settings: the solver's settings (`SOLVERS[name].accepted_settings()` lists them;
            inner_step and outer_step are required).

    Raises a one-line ValueError for an unknown name, TypeError for an unknown or missing
    setting, and the solver's own one-line errors for a bad value.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown stochastic solver {name!r}; choose one of {', '.join(SOLVERS)}")
    accepted, required = SOLVERS[name].accepted_settings()
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for solver {name!r}; it accepts: {', '.join(accepted)}"
        )
    missing = [s for s in required if s not in settings]
    if missing:
        raise TypeError(f"solver {name!r} needs {', '.join(f'{s}=...' for s in missing)}")
    return SOLVERS[name](problem, **settings)


__all__ = [
    "SOLVERS",
    "AmIGO",
    "DataCleaning",
    "DivergenceError",
    "LogisticRegularisation",
    "MASOBA",
    "QuadraticProblem",
    "SABA",
    "SoftmaxRegularisation",
    "SOBA",
    "Sampler",
    "StocBiO",
    "StochasticProblem",
    "StochasticSolver",
    "make",
]
