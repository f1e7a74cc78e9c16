"""Implicit differentiation at w_T, taken as an approximate fixed point of the dynamics.

If w_lambda solves G(w, lambda) = 0, with G the dynamics' stationarity map
(dL/dw plus any weight decay), then for a cotangent b on w:

    q solves  (dG/dw)^T q = b,     hypergradient = -(dG/dlambda)^T q

`implicit-cg` solves for q by conjugate gradient, `implicit-neumann` by a
Neumann series; `fixed-point` instead iterates the adjoint of the user's own
step, x = A^T x + b, and returns B^T x (Phi_T at its fixed point, optimiser
state included). All three cost one graph of G (or of one step) plus one
Hessian-vector product per iteration, and O(d) memory whatever T is.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import validate
from ..errors import SolverWarning
from . import linear
from .problem import Init, InnerProblem, leaves, vjp


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

    def solve(matvec, b, solution):
        return linear.conjugate_gradient(matvec, b, iterations=iterations, tolerance=tolerance)

    return _stationary(problem, init, hparams, steps, solve, iterations, tolerance)


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

    def solve(matvec, b, solution):
        rates = problem.dynamics.learning_rates(solution.hparams)
        scale = [alpha if alpha is not None else rates(k) for k in problem.keys]
        scale = [s.detach() if isinstance(s, Tensor) else s for s in scale]

        def step(v):
            return tuple(s * x for s, x in zip(scale, v))

        return linear.neumann(matvec, b, step=step, iterations=iterations, tolerance=tolerance)

    return _stationary(problem, init, hparams, steps, solve, iterations, tolerance)


def fixed_point(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    iterations: int = 500,
    tolerance: float = 1e-10,
) -> ImplicitSolution:
    """Hypergradient from the fixed-point equation of the inner step map itself."""
    _check_solver_options(iterations, tolerance)
    z = problem.run(problem.start(init, hparams), hparams, 1, steps)
    return ImplicitSolution(problem, hparams, z, steps, _pull_fixed_point(iterations, tolerance))


def _stationary(problem, init, hparams, steps, solve, iterations, tolerance):
    _check_solver_options(iterations, tolerance)
    z = problem.run(problem.start(init, hparams), hparams, 1, steps)
    return ImplicitSolution(problem, hparams, z, steps, _pull_stationary(solve))


class ImplicitSolution:
    """w_T, and the implicit pull-back of a cotangent on it."""

    def __init__(self, problem, hparams, z, steps, pull):
        self.problem, self.hparams, self.z, self.steps, self.pull = problem, hparams, z, steps, pull
        self.params = problem.params_of(z)
        self.info: dict = {}

    def vjp(self, adjoint: Mapping[str, Tensor], initial: bool = False):
        """The implicit pull-back; w_lambda does not depend on w_0, so its part is None."""
        grads, self.info = self.pull(self, adjoint)
        if not self.info["converged"]:
            warnings.warn(
                f"the implicit linear solve stopped after {self.info['iterations']} iterations at "
                f"relative residual {self.info['residual']:.1e}: the hypergradient is inexact. "
                "Raise `iterations`, or run the inner problem closer to its minimum (more steps).",
                SolverWarning,
                stacklevel=2,
            )
        return dict(zip(self.hparams, grads)), None


def _pull_stationary(solve):
    def pull(solution: ImplicitSolution, adjoint):
        problem, hparams = solution.problem, solution.hparams
        lam = list(hparams.values())
        params = {k: v.detach().requires_grad_(True) for k, v in solution.params.items()}
        w = [params[k] for k in problem.keys]
        _, grads = problem.gradients(params, hparams, solution.steps, create_graph=True)
        with torch.enable_grad():
            g = problem.dynamics.stationarity(params, grads, hparams)
        g = [g[k] for k in problem.keys]

        def hessian_times(v):  # symmetric: a vjp of the gradient is a Hessian-vector product
            return tuple(torch.autograd.grad(g, w, v, retain_graph=True, allow_unused=True))

        b = tuple(adjoint[k] for k in problem.keys)
        q, info = solve(_zeros_for_none(hessian_times, w), b, solution)
        return [-x for x in vjp(g, lam, q)], info

    return pull


def _pull_fixed_point(iterations, tolerance):
    def pull(solution: ImplicitSolution, adjoint):
        problem, hparams = solution.problem, solution.hparams
        lam = list(hparams.values())
        z = leaves(solution.z)
        z_next, _ = problem.step(z, hparams, solution.steps)  # Phi_T, at its fixed point

        def transpose_jacobian(x):
            return tuple(torch.autograd.grad(z_next, z, x, retain_graph=True, allow_unused=True))

        b = problem.adjoint(adjoint, z)
        x, info = linear.fixed_point(
            _zeros_for_none(transpose_jacobian, z), b, iterations=iterations, tolerance=tolerance
        )
        return list(vjp(z_next, lam, x)), info

    return pull


def _zeros_for_none(matvec, like):
    def wrapped(v):
        return tuple(validate.zeros_if_none(y, x) for x, y in zip(like, matvec(v)))

    return wrapped


def _check_solver_options(iterations, tolerance) -> None:
    validate.positive_int("iterations", iterations)
    validate.non_negative("tolerance", tolerance)
