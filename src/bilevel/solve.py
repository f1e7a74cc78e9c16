"""The engine as a node of an ordinary autograd graph: a differentiable inner solve.

    w_T = bilevel.solve(inner, params, hparams, dynamics, steps, method="reverse")
    outer(w_T, hparams).backward()   # reaches hparams and everything upstream of them

The forward pass runs the inner dynamics; the backward pass pulls the incoming
cotangent on w_T back with the chosen method, into the hyperparameters (and
into w_0 where it requires grad), from where ordinary autograd continues.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validate
from .dynamics import Dynamics
from .precision import Precision, check_hypergradient
from .problem import Problem
from .typing import Hparams, Init, Objective


def solve(
    inner: Objective,
    params: Init,
    hparams: Hparams,
    dynamics: Dynamics,
    steps: int,
    method: str = "reverse",
    *,
    precision: Precision | str | torch.dtype | None = None,
    **options,
) -> dict[str, Tensor]:
    """w_T after `steps` inner steps, differentiable with respect to hparams (and w_0).

    Args:
        inner: L(params, hparams[, step]) -> scalar tensor (see `bilevel.hypergradient`).
        params: w_0 as a dict of tensors (those that require grad get a gradient too), or a
            callable hparams -> w_0.
        hparams: dict of tensors; those that require grad (leaves or computed by an upstream
            graph) receive gradients, the others are constants. May be empty.
        dynamics: the inner optimiser; steps: T; method and **options: as in
            `bilevel.hypergradient` (forward mode cannot differentiate w_0).
        precision: None, "bf16", "fp16" or a bilevel.Precision: the inner objective under
            torch.autocast, as in `bilevel.hypergradient`.
    Returns:
        w_T as a dict of tensors, a node of the autograd graph: `.backward()` on anything
        computed from it pulls back by `method` into hparams and w_0. When nothing requires
        grad (say, under torch.no_grad() at meta-test time) the inner run keeps no graph and
        stores nothing.
    """
    problem = Problem.create(
        inner, None, params, hparams, dynamics, steps, method, options, require_grad=False,
        precision=precision,
    )  # fmt: skip
    keys, names = list(problem.inner.keys), list(hparams)
    start = [] if callable(params) else [params[k] for k in keys]
    tracked = [t for t in (*start, *hparams.values()) if t.requires_grad]
    if not (torch.is_grad_enabled() and tracked):
        inner_problem = problem.inner
        z = inner_problem.run(inner_problem.start(params, hparams), hparams, 1, steps)
        return inner_problem.params_of(z)
    if method == "forward" and any(v.requires_grad for v in start):
        raise ValueError(
            "method 'forward' cannot differentiate with respect to params (a d x d Jacobian); "
            "detach them, pass params as a callable of hparams, or use method='reverse'"
        )
    spec = (problem, callable(params), names)
    outputs = _Solve.apply(spec, *start, *hparams.values())
    return dict(zip(keys, outputs))


class _Solve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *tensors):
        problem, learned, names = spec
        keys = problem.inner.keys
        n = 0 if learned else len(keys)  # w_0 tensors come first when they are inputs
        if n:
            problem = problem.with_params({k: t.detach() for k, t in zip(keys, tensors[:n])})
        ctx.solution = problem.solution(dict(zip(names, tensors[n:])))
        ctx.keys, ctx.names, ctx.n_init = keys, names, n
        return tuple(ctx.solution.params[k].detach().clone() for k in keys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *cotangents):
        if ctx.solution is None:
            raise RuntimeError(
                "bilevel.solve: a second backward through one solve is not supported"
            )
        params = ctx.solution.params
        adjoint = {k: validate.zeros_if_none(c, params[k]) for k, c in zip(ctx.keys, cotangents)}
        n = ctx.n_init  # w_0 tensors come first among the inputs, after the spec
        grads, init_grads = ctx.solution.vjp(adjoint, initial=any(ctx.needs_input_grad[1 : n + 1]))
        precision = ctx.solution.problem.precision
        ctx.solution = None  # release the stored trajectory or graph
        check_hypergradient(grads, precision)
        init = [None] * n if init_grads is None else [init_grads[k] for k in ctx.keys[:n]]
        return (None, *init, *(grads[k] for k in ctx.names))
