"""The hypergradient methods: one function each, one signature (bilevel.typing.Method),

    method(problem, init, hparams, steps, **options) -> Solution

that runs the inner dynamics and returns a solution with `.params` (w_T), `.info` and
`.vjp(cotangent on w_T) -> (cotangent on hparams, cotangent on w_0 or None)`.
`bilevel.Problem` validates a problem once and runs a method on it; `hypergradient` adds the
outer objective's direct term; `bilevel.solve` wraps the same solution as a node of an
autograd graph.
"""

from __future__ import annotations

from ..typing import Method
from .auto import auto
from .forward import ForwardSolver, forward
from .implicit import fixed_point, implicit_cg, implicit_neumann
from .problem import InnerProblem
from .reverse import reverse, truncated

METHODS: dict[str, Method] = {
    "reverse": reverse,
    "truncated": truncated,
    "forward": forward,
    "implicit-cg": implicit_cg,
    "implicit-neumann": implicit_neumann,
    "fixed-point": fixed_point,
    "auto": auto,  # Problem.create resolves it once into one of the above
}

__all__ = ["METHODS", "ForwardSolver", "InnerProblem"]
