"""Implicit differentiation: one mechanism for the built-in methods and for any user's solver.

If w(lambda) solves an optimality condition F(w, lambda) = 0 and dF/dw is invertible there,
then for a cotangent b on w

    q solves  (dF/dw)^T q = b,     the cotangent on lambda is  -(dF/dlambda)^T q.

`RootSystem` holds F at a solution with its autograd graph and gives the products a linear
solver needs ((dF/dw)^T v, dF/dw v) and the final pull to lambda; `pull_back` solves and pulls.
Everything implicit goes through those two:

- the methods `implicit-cg` and `implicit-neumann` take F = the dynamics' stationarity map
  (dL/dw plus any weight decay) at w_T; `fixed-point` takes F = Phi_T(z) - z, the whole step
  map with the optimiser's state;
- `custom_root`, `custom_argmin` and `custom_fixed_point` wrap ANY solver (a torch.optim loop,
  a closed form, L-BFGS, a library call) into a function whose result is a node of the
  autograd graph: the solver runs without a graph, and the backward pass solves the system.

Every solve costs one graph of F plus one vector-Jacobian product per iteration, and O(d)
memory however the solution was found.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import validate
from ..errors import SolverWarning
from . import linear
from .problem import Flat, Init, InnerProblem, RandomState, detach, evaluate, leaves, vjp

LinearSolve = Callable[..., tuple[Flat, dict]]

# -- the one mechanism ---------------------------------------------------------------------


@dataclass
class RootSystem:
    """F(w, lambda) evaluated at a solution, with its graph, over flat tuples of tensors."""

    residual: Flat  # F(w, lambda)
    w: Flat  # leaves that require grad
    lam: Flat  # leaves that require grad

    @staticmethod
    def at(optimality: Callable[[Flat, Flat], Sequence[Tensor]], w, lam) -> RootSystem:
        """Evaluate `optimality(w, lam)` on fresh leaves, keeping the graph for the solve."""
        w, lam = leaves(w), leaves(lam)
        with torch.enable_grad():  # an autograd.Function's backward runs without grad
            residual = tuple(optimality(w, lam))
        for r, v in zip(residual, w):
            if r.shape != v.shape:
                raise ValueError(
                    f"the optimality condition returned shape {tuple(r.shape)} for a parameter "
                    f"of shape {tuple(v.shape)}: F(w, lambda) must have the structure of w"
                )
        return RootSystem(residual, w, lam)

    def transposed(self, v: Flat) -> Flat:
        """(dF/dw)^T v: one vector-Jacobian product through the kept graph."""
        return vjp(self.residual, self.w, v, retain_graph=True)

    def forward(self, v: Flat) -> Flat:
        """(dF/dw) v, by differentiating the linear map u -> (dF/dw)^T u (double-vjp trick):
        what normal-equation solvers need besides the transposed product."""
        u = tuple(torch.zeros_like(r).requires_grad_(True) for r in self.residual)
        with torch.enable_grad():
            transposed = vjp(self.residual, self.w, u, retain_graph=True, create_graph=True)
            return vjp(transposed, u, v, retain_graph=True)

    def pull(self, q: Flat) -> Flat:
        """-(dF/dlambda)^T q: the cotangent on lambda once the system is solved."""
        return tuple(-g for g in vjp(self.residual, self.lam, q, retain_graph=True))


def pull_back(system: RootSystem, cotangent: Flat, solve: LinearSolve) -> tuple[Flat, dict]:
    """Solve (dF/dw)^T q = cotangent with `solve(matvec, b, rmatvec=...)`; pull q to lambda."""
    q, info = solve(system.transposed, tuple(cotangent), rmatvec=system.forward)
    return system.pull(q), info


def warn_if_inexact(info: dict, advice: str, stacklevel: int = 3) -> None:
    if not info["converged"]:
        warnings.warn(
            f"the implicit linear solve stopped after {info['iterations']} iterations at "
            f"relative residual {info['residual']:.1e}: the hypergradient is inexact. {advice}",
            SolverWarning,
            stacklevel=stacklevel,
        )


# -- linear solvers by name ----------------------------------------------------------------


def linear_solver(name: str, iterations: int, tolerance: float, **settings) -> LinearSolve:
    """A registered solver of `linear.SOLVERS`, or "fixed-point" (iterate x = (J^T x + b) of a
    fixed-point map, where the system's matrix is J - I), bound to its settings."""
    validate.positive_int("iterations", iterations)
    validate.non_negative("tolerance", tolerance)
    if name == "fixed-point":

        def iterate(matvec, b, rmatvec=None):  # (J^T - I) q = b  <=>  x = J^T x + b, q = -x
            x, info = linear.fixed_point(
                lambda v: tuple(a + c for a, c in zip(matvec(v), v)),
                b,
                iterations=iterations,
                tolerance=tolerance,
            )
            return tuple(-v for v in x), info

        return iterate
    if name not in linear.SOLVERS:
        names = ", ".join([*linear.SOLVERS, "fixed-point"])
        raise ValueError(f"unknown linear solver {name!r}; choose one of {names}")
    return functools.partial(
        linear.SOLVERS[name], iterations=iterations, tolerance=tolerance, **settings
    )


# -- the built-in methods: implicit differentiation at the end of the inner run -------------


def implicit_cg(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    iterations: int = 100,
    tolerance: float = 1e-10,
) -> ImplicitSolution:
    """Hypergradient at w_T with (d^2 L/dw^2) q = b solved by conjugate gradient."""
    solve = linear_solver("cg", iterations, tolerance)
    return _at_the_end(problem, init, hparams, steps, _stationarity(problem, hparams, steps), solve)


def implicit_neumann(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    iterations: int = 500,
    tolerance: float = 1e-10,
    alpha: float | None = None,
) -> ImplicitSolution:
    """As implicit-cg with a Neumann series; `alpha` defaults to the inner learning rate."""
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if alpha is None and problem.dynamics.name != "sgd":
        raise ValueError(
            f"implicit-neumann needs alpha=... with {problem.dynamics.name} dynamics: the "
            "learning rate is a safe Neumann step only for plain gradient descent"
        )
    validate.positive_int("iterations", iterations)
    validate.non_negative("tolerance", tolerance)
    rates = problem.dynamics.learning_rates(detach(hparams))
    scale = [alpha if alpha is not None else rates(k) for k in problem.keys]
    scale = [s.detach() if isinstance(s, Tensor) else s for s in scale]

    def solve(matvec, b, rmatvec=None):
        def step(v):
            return tuple(s * x for s, x in zip(scale, v))

        return linear.neumann(matvec, b, step=step, iterations=iterations, tolerance=tolerance)

    return _at_the_end(problem, init, hparams, steps, _stationarity(problem, hparams, steps), solve)


def fixed_point(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    iterations: int = 500,
    tolerance: float = 1e-10,
) -> ImplicitSolution:
    """Hypergradient from the fixed-point equation of the inner step map itself (optimiser
    state included), solved by fixed-point iteration."""
    solve = linear_solver("fixed-point", iterations, tolerance)

    names = tuple(hparams)

    def optimality(z, lam):  # F = Phi_T(z) - z
        z_next, _ = problem.full_precision.step(z, dict(zip(names, lam)), steps)
        return tuple(a - b for a, b in zip(z_next, z))

    return _at_the_end(problem, init, hparams, steps, optimality, solve, whole_state=True)


def _stationarity(problem: InnerProblem, hparams: Mapping[str, Tensor], steps: int):
    """F(w, lambda) = dL/dw + weight decay, the map whose zero the dynamics converge to."""
    names = tuple(hparams)

    def optimality(w, lam):
        hparams = dict(zip(names, lam))
        params = dict(zip(problem.keys, w))
        _, grads = problem.full_precision.gradients(params, hparams, steps, create_graph=True)
        g = problem.dynamics.stationarity(params, grads, hparams)
        return tuple(g[k] for k in problem.keys)

    return optimality


def _at_the_end(problem, init, hparams, steps, optimality, solve, whole_state=False):
    """Run the inner steps without a graph; differentiate implicitly at the last state."""
    z = problem.run(problem.start(init, hparams), hparams, 1, steps - 1)
    random = RandomState.capture(z)  # the last step's draws, for the system at the end
    z = problem.run(z, hparams, steps, 1)
    return ImplicitSolution(problem, init, hparams, z, optimality, solve, random, whole_state)


class ImplicitSolution:
    """w_T, and the implicit pull-back of a cotangent on it (any number of times)."""

    def __init__(self, problem, init, hparams, z, optimality, solve, random, whole_state):
        self.problem, self.init, self.hparams, self.z = problem, init, hparams, z
        self.optimality, self.solve, self.random = optimality, solve, random
        self.whole_state = whole_state
        self.params = problem.params_of(z)
        self.info: dict = {}

    def vjp(self, adjoint: Mapping[str, Tensor], initial: bool = False):
        """The implicit pull-back; w_lambda does not depend on w_0, so its part is None."""
        problem = self.problem
        w = self.z if self.whole_state else tuple(self.params[k] for k in problem.keys)
        b = problem.adjoint(adjoint, self.z)[: len(w)]
        with self.random.restored():
            system = RootSystem.at(self.optimality, w, tuple(self.hparams.values()))
        grads, self.info = pull_back(system, b, self.solve)
        warn_if_inexact(
            self.info,
            "Raise `iterations`, or run the inner problem closer to its minimum (more steps).",
        )
        return dict(zip(self.hparams, grads)), None


# -- any solver ------------------------------------------------------------------------------

Params = dict[str, Tensor]


def custom_root(
    optimality: Callable[[Params, Mapping[str, Tensor]], Mapping[str, Tensor]],
    *,
    linear_solver: str = "gmres",
    iterations: int = 200,
    tolerance: float = 1e-10,
    **solver_settings,
):
    """Make any solver differentiable by the implicit function theorem (a decorator).

    Args:
        optimality: F(params, hparams) -> a dict keyed and shaped like params, zero at the
            solution (a gradient, a KKT residual, Phi(w) - w). It must be differentiable.
        linear_solver: how to solve the adjoint system (dF/dw)^T q = b: "gmres" (default, any
            invertible Jacobian), "bicgstab", "cg" (symmetric positive definite, e.g. the
            Hessian at a strict minimum), "normal-cg" (CG on the normal equations: any
            full-rank Jacobian), "dense" (builds the matrix: small problems), "fixed-point"
            (iteration; converges when F = Phi - w with Phi a contraction).
        iterations: the linear solver's budget.
        tolerance: its relative residual target; an unconverged solve warns
            (bilevel.SolverWarning).
        **solver_settings: passed to the linear solver (e.g. restart=... for gmres).

    Returns:
        A decorator: `solver(hparams, *args, **kwargs) -> params` becomes a function with the
        same arguments whose result is differentiable with respect to every tensor of
        `hparams` that requires grad (any shape, 0-dim included; non-leaf ones pass the
        gradient on upstream). The solver itself runs under torch.no_grad() on detached
        hyperparameters, so it can be anything; `*args` and `**kwargs` (data, a warm start)
        reach it unchanged and are not differentiated. The decorated function's `.info` holds
        the last backward pass's iterations, residual and convergence.

    Batched problems (independent problems stacked along a leading dimension) are one block-
    diagonal system, solved together. The backward pass is not itself differentiable
    (no second derivatives), and torch.func transforms (vmap, grad, jacrev) do not apply:
    the solver is opaque to them; use torch.autograd (backward, autograd.grad,
    torch.autograd.functional.jacobian) instead.
    """
    solve = _bound_solver(linear_solver, iterations, tolerance, solver_settings)
    validate.objective("optimality", optimality)

    def decorate(solver: Callable[..., Mapping[str, Tensor]]):
        validate.objective("solver", solver)

        @functools.wraps(solver)
        def solved(hparams: Mapping[str, Tensor], *args, **kwargs) -> dict[str, Tensor]:
            validate.tensor_dict("hparams", hparams, allow_empty=True)
            spec = _RootSpec(solver, optimality, solve, args, kwargs, tuple(hparams), solved)
            keys_and_values = _Root.apply(spec, *hparams.values())
            return dict(zip(spec.keys, keys_and_values))

        solved.info = {}
        return solved

    return decorate


def custom_argmin(
    objective: Callable[[Params, Mapping[str, Tensor]], Tensor],
    *,
    linear_solver: str = "cg",
    iterations: int = 200,
    tolerance: float = 1e-10,
    **solver_settings,
):
    """`custom_root` for a solver that minimises `objective(params, hparams)` (a scalar):
    the optimality condition is its gradient in params, whose Jacobian (the Hessian) is
    symmetric, so conjugate gradient is the default linear solver."""
    validate.objective("objective", objective)

    def gradient(params, hparams):  # params are leaves that require grad (RootSystem.at)
        value = evaluate("inner", objective, params, hparams)
        keys = list(params)
        grads = torch.autograd.grad(value, [params[k] for k in keys], create_graph=True)
        return dict(zip(keys, grads))

    return custom_root(
        gradient,
        linear_solver=linear_solver,
        iterations=iterations,
        tolerance=tolerance,
        **solver_settings,
    )


def custom_fixed_point(
    mapping: Callable[[Params, Mapping[str, Tensor]], Mapping[str, Tensor]],
    *,
    linear_solver: str = "gmres",
    iterations: int = 200,
    tolerance: float = 1e-10,
    **solver_settings,
):
    """`custom_root` for a solver that returns a fixed point w = Phi(w, hparams) (a projected
    gradient step, a proximal map, an EM update): the optimality condition is Phi(w) - w.
    `linear_solver="fixed-point"` iterates the adjoint of Phi (cheapest when Phi contracts)."""
    validate.objective("mapping", mapping)

    def residual(params, hparams):
        image = mapping(params, hparams)
        return {k: image[k] - v for k, v in params.items()}

    return custom_root(
        residual,
        linear_solver=linear_solver,
        iterations=iterations,
        tolerance=tolerance,
        **solver_settings,
    )


def _bound_solver(name, iterations, tolerance, settings) -> LinearSolve:
    if not isinstance(name, str):
        raise TypeError(f"linear_solver must be a solver's name, got {type(name).__name__}")
    return linear_solver(name, iterations, tolerance, **settings)


@dataclass
class _RootSpec:
    solver: Callable
    optimality: Callable
    solve: LinearSolve
    args: tuple
    kwargs: dict
    hparam_keys: tuple[str, ...]
    owner: Callable  # the decorated function, whose .info reports the last solve
    keys: tuple[str, ...] = ()


class _Root(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _RootSpec, *hparam_values):
        lam = dict(zip(spec.hparam_keys, (v.detach() for v in hparam_values)))
        with torch.no_grad():
            params = spec.solver(lam, *spec.args, **spec.kwargs)
        validate.tensor_dict("the solver's result", params)
        spec.keys = tuple(params)
        ctx.spec, ctx.params = spec, tuple(params[k].detach() for k in spec.keys)
        ctx.lam = tuple(lam.values())
        return tuple(v.clone() for v in ctx.params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *cotangents):
        spec = ctx.spec

        def optimality(w, lam):
            hparams = dict(zip(spec.hparam_keys, lam))
            residual = spec.optimality(dict(zip(spec.keys, w)), hparams)
            if not isinstance(residual, Mapping) or set(residual) != set(spec.keys):
                got = sorted(residual) if isinstance(residual, Mapping) else type(residual)
                raise ValueError(
                    f"the optimality condition must return a dict with the solver's keys "
                    f"{sorted(spec.keys)}, got {got}"
                )
            return tuple(residual[k] for k in spec.keys)

        b = tuple(validate.zeros_if_none(c, w) for c, w in zip(cotangents, ctx.params))
        system = RootSystem.at(optimality, ctx.params, ctx.lam)
        grads, info = pull_back(system, b, spec.solve)
        spec.owner.info = info
        warn_if_inexact(info, "Raise `iterations`, or check that the solver converged.")
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])))
