"""Hypergradients of f_T(lambda) = E(w_T(lambda), lambda): every method behind one call.

Each method is a function with one signature,

    method(problem, init, hparams, steps, **options) -> solution

that runs the inner dynamics and returns a solution with `.params` (w_T) and
`.vjp(cotangent on w_T) -> (cotangent on hparams, cotangent on w_0 or None)`.
`hypergradient` adds the outer objective's direct term; `bilevel.solve` wraps
the same solution as a node of an autograd graph.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import validate
from ..dynamics import Dynamics
from ..errors import HypergradientError, HypergradientWarning
from .forward import ForwardSolver, forward
from .implicit import fixed_point, implicit_cg, implicit_neumann
from .problem import Init, InnerProblem, Objective, evaluate, with_step
from .reverse import reverse, truncated

METHODS: dict[str, Callable] = {
    "reverse": reverse,
    "truncated": truncated,
    "forward": forward,
    "implicit-cg": implicit_cg,
    "implicit-neumann": implicit_neumann,
    "fixed-point": fixed_point,
}

__all__ = [
    "METHODS",
    "Result",
    "hypergradient",
    "prepare",
    "pull_back",
    "ForwardSolver",
    "InnerProblem",
]


@dataclass
class Result:
    """What `hypergradient` returns."""

    grads: dict[
        str, Tensor
    ]  # d f_T / d lambda (implicit methods: their estimate of d f / d lambda)
    params: dict[str, Tensor]  # w_T
    value: float  # f_T(lambda) = E(w_T, lambda)
    method: str
    seconds: float
    info: dict = field(default_factory=dict)  # solver iterations and residuals, where any
    hparams: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def backward(self) -> None:
        """Continue back-propagation from the hyperparameters into whatever computed them.

        Leaf hyperparameters accumulate the hypergradient in `.grad`, as after
        `loss.backward()`; non-leaf ones (features of a network) pass it upstream.
        """
        keys = list(self.hparams)
        torch.autograd.backward([self.hparams[k] for k in keys], [self.grads[k] for k in keys])


def prepare(
    inner: Objective,
    params: Init,
    hparams: Mapping[str, Tensor],
    dynamics: Dynamics,
    steps: int,
    method: str,
    options: Mapping[str, object],
    require_grad: bool = True,
):
    """Validate a problem; return (InnerProblem, method function)."""
    validate.objective("inner", inner)
    if require_grad:
        validate.hyperparameters(hparams)
    else:  # a plain differentiable solve may have no hyperparameters at all
        validate.tensor_dict("hparams", hparams, allow_empty=True)
    if not isinstance(dynamics, Dynamics):
        raise TypeError(
            f"dynamics must be a bilevel.Dynamics such as bilevel.sgd(lr=0.1), got "
            f"{type(dynamics).__name__}"
        )
    validate.steps(steps)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "bilevel needs autograd for the inner gradients, which torch.inference_mode() "
            "disables; use torch.no_grad() instead"
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    validate.options(method, METHODS[method], options)
    if callable(params):
        with torch.no_grad():  # only to learn the keys: stay out of the user's graph
            start = params({k: v.detach() for k, v in hparams.items()})
    else:
        start = params
    validate.tensor_dict("params" if not callable(params) else "params(hparams)", start)
    validate.same_kind(start, hparams)
    return InnerProblem(with_step(inner), dynamics, tuple(start)), METHODS[method]


def hypergradient(
    inner: Objective,
    outer: Objective,
    params: Init,
    hparams: Mapping[str, Tensor],
    dynamics: Dynamics,
    steps: int,
    method: str = "reverse",
    **options,
) -> Result:
    """The hypergradient of f_T(lambda) = outer(w_T, lambda) by the chosen method.

    `params` is w_0, or a callable hparams -> w_0 for a learned initialisation.
    `hparams` are not modified; non-leaf ones stay connected (see Result.backward).
    """
    validate.objective("outer", outer)
    problem, run = prepare(inner, params, hparams, dynamics, steps, method, options)
    if not callable(params):
        for key, tensor in params.items():
            if tensor.requires_grad:
                raise ValueError(
                    f"params[{key!r}] requires grad, but hypergradient() treats w_0 as a "
                    "constant: for a learned initialisation pass params=lambda h: {...} (a "
                    "function of hparams), or use bilevel.solve; else pass it detached"
                )
    began = time.perf_counter()
    lam = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    solution = run(problem, params, lam, steps, **options)
    value, grads = pull_back(outer, solution, lam)
    return Result(
        grads=grads,
        params={k: v.detach() for k, v in solution.params.items()},
        value=value,
        method=method,
        seconds=time.perf_counter() - began,
        info=dict(getattr(solution, "info", {})),
        hparams=dict(hparams),
    )


def pull_back(outer: Objective, solution, lam: Mapping[str, Tensor]):
    """(E(w_T, lambda), its total derivative): the direct term plus the solution's pull-back."""
    w_T = {k: v.detach().requires_grad_(True) for k, v in solution.params.items()}
    with torch.enable_grad():
        value = evaluate("outer", outer, w_T, lam)
        if not value.requires_grad:
            raise ValueError(
                "the outer objective depends neither on params nor on hparams (its value has "
                "no autograd graph): did it detach, or go through .item() or numpy?"
            )
        direct = torch.autograd.grad(value, [*w_T.values(), *lam.values()], allow_unused=True)
    outer_value = float(value.detach())
    if not math.isfinite(outer_value):
        raise HypergradientError(
            f"the outer objective is {outer_value} at w_T (the inner run was finite): its "
            "hypergradient is undefined; check the outer objective at the inner solution"
        )
    adjoint = {k: validate.zeros_if_none(g, w_T[k]) for k, g in zip(w_T, direct)}
    pulled, _ = solution.vjp(adjoint)
    direct_lam = direct[len(w_T) :]
    grads = {k: pulled[k] + validate.zeros_if_none(g, lam[k]) for k, g in zip(lam, direct_lam)}
    validate.finite("hypergradient", grads, HypergradientError)
    _warn_unused(outer, solution, lam, grads)
    return outer_value, grads


def _warn_unused(outer: Objective, solution, lam: Mapping[str, Tensor], grads) -> None:
    """Warn about hyperparameters that nothing depends on (their hypergradient is zero by
    construction). Only exactly-zero hypergradients are probed, so this is free otherwise."""
    zero = torch.stack([~g.any() for g in grads.values()])
    if not bool(zero.any()):
        return
    candidates = [k for k, z in zip(grads, zero.tolist()) if z]
    unused = unreached(solution.problem, getattr(solution, "init", None), outer, solution, lam)
    for key in [k for k in candidates if k in unused]:
        warnings.warn(
            f"hparams[{key!r}] affects neither the inner objective, the dynamics' settings, w_0 "
            "nor the outer objective: its hypergradient is zero",
            HypergradientWarning,
            stacklevel=3,
        )


def unreached(problem: InnerProblem, init, outer: Objective, solution, lam) -> set[str]:
    """Names of the hyperparameters that no part of the problem reads: one step with its graph
    from w_T, the outer objective there, and Phi_0 if w_0 is learned."""
    lam = {k: v.detach().requires_grad_(True) for k, v in lam.items()}
    params = {k: v.detach().requires_grad_(True) for k, v in solution.params.items()}
    with torch.enable_grad():
        z, _ = problem.step(problem.pack(params, problem.dynamics.init(params)), lam, 1)
        outputs = [*z, evaluate("outer", outer, params, lam)]
        if callable(init):
            outputs += list(init(lam).values())
        reached = torch.autograd.grad(
            [o.sum() for o in outputs if o.requires_grad], list(lam.values()), allow_unused=True
        )
    return {k for k, g in zip(lam, reached) if g is None}
