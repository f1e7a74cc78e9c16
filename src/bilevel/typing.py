"""The engine's contract: the types every part of bilevel agrees on.

A *method* (reverse, forward, implicit-cg, ...) is a function

    method(problem: InnerProblem, init: Init, hparams: Hparams, steps: int, **options) -> Solution

and a *solution* carries w_T and pulls a cotangent on it back to the hyperparameters. Whatever
implements these Protocols works with `hypergradient`, `solve`, `check` and the outer loops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from .hypergrad.problem import InnerProblem

Params = dict[str, Tensor]
"""Inner variables w: named tensors."""

Hparams = Mapping[str, Tensor]
"""Outer variables lambda: named tensors (leaves, or computed by an upstream graph)."""

Objective = Callable[..., Tensor]
"""`objective(params, hparams) -> scalar tensor`; an inner objective may also declare the step
number (a third positional parameter without a default, or one named `step` or `t`)."""

Init = Params | Callable[[Hparams], Params]
"""w_0: a dict of tensors, or a function of the hyperparameters (a learned initialisation)."""

Setting = float | Callable[[Hparams], Tensor | Mapping[str, Tensor]]
"""A setting of the dynamics (lr, momentum, ...): a float, or a function of the
hyperparameters returning a tensor or a dict with one value per parameter."""


@runtime_checkable
class Solution(Protocol):
    """What a method returns: w_T and the pull-back of a cotangent on it.

    `vjp(adjoint, initial)` returns (cotangent on each hyperparameter, cotangent on w_0 when
    `initial` is True and the method can give it, else None). Reverse-mode solutions free their
    graph in `vjp` and are pulled back once; forward and implicit ones any number of times.
    `info` holds what the method reports (solver iterations and residuals, notes).
    """

    params: Params
    info: dict

    def vjp(
        self, adjoint: Mapping[str, Tensor], initial: bool = False
    ) -> tuple[dict[str, Tensor], Params | None]: ...


class Method(Protocol):
    """A hypergradient method; its options are its keyword-only parameters."""

    def __call__(
        self, problem: InnerProblem, init: Init, hparams: Hparams, steps: int, **options
    ) -> Solution: ...


__all__ = ["Hparams", "Init", "Method", "Objective", "Params", "Setting", "Solution"]
