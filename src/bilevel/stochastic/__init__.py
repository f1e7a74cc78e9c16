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
from .bome import BOME
from .f2sa import F2SA
from .fsla import FSLA
from .implicit import Implicit
from .learning import DataCleaning, LogisticRegularisation, SoftmaxRegularisation
from .momentum import MRBO, SUSTAIN
from .problem import Sampler, StochasticProblem
from .problems import QuadraticProblem
from .pzobo import PZOBO
from .saba import SABA
from .soba import MASOBA, SOBA
from .solver import DivergenceError, StochasticSolver
from .srba import SRBA
from .stocbio import StocBiO
from .ttsa import BSA, TTSA
from .unrolled import Unrolled
from .vrbo import VRBO

# in the order they were added: single-loop and variance-reduced, double-loop, first- and
# zeroth-order, then the engine's deterministic hypergradients with warm starts (references)
SOLVERS: dict[str, type[StochasticSolver]] = {
    solver.name: solver
    for solver in (
        *(SOBA, MASOBA, SABA, AmIGO, StocBiO),
        *(SRBA, FSLA, MRBO, SUSTAIN, VRBO, TTSA, BSA),
        *(F2SA, BOME, PZOBO),
        *(Unrolled, Implicit),
    )
}


def make(name: str, problem: StochasticProblem, **settings) -> StochasticSolver:
    """The solver registered as `name` in SOLVERS, built on `problem` with `settings`.

    Args:
        name: one of SOLVERS (`bilevel.stochastic.SOLVERS`: "soba", "ma-soba", "saba",
            "amigo", "stocbio", "srba", "fsla", "mrbo", "sustain", "vrbo", "ttsa", "bsa",
            "f2sa", "bome", "pzobo", and the engine's references "unrolled", "implicit").
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
    "F2SA",
    "BOME",
    "PZOBO",
    "Unrolled",
    "Implicit",
    "TTSA",
    "BSA",
    "MRBO",
    "VRBO",
    "SRBA",
    "SUSTAIN",
    "FSLA",
]
