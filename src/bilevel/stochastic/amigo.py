"""AmIGO: warm-started inner SGD and linear-system SGD, then one outer step."""

from __future__ import annotations

from .. import validate
from .solver import StochasticSolver


class AmIGO(StochasticSolver):
    """AmIGO, Amortized Implicit Gradient Optimization: Arbel & Mairal, "Amortized implicit
    differentiation for stochastic bilevel optimization", ICLR 2022, Algorithm 1 (AmIGO),
    with its stochastic inner solver (Algorithm 2: SGD on z) and its stochastic linear-system
    solver (Algorithm 3: SGD on the quadratic 1/2 v^T A v + v^T b, A = d2_zz G, b = grad_z F).

    Each iteration, warm-started from the last z and v (the amortization):

        T times:  z -= rho grad_z g_B(x, z)                  (a fresh inner minibatch each)
        draw J:   b = grad_z f_J(x, z),  d = grad_x f_J(x, z)
        N times:  v -= beta (d2_zz g_B(x, z) v + b)          (a fresh inner minibatch each)
        draw B':  x -= gamma (d + d2_xz g_B'(x, z) v)

    Choices where the paper leaves room: b is drawn once per iteration and held for the N
    linear steps (the linear solver takes b as its input), and the direct term d comes from
    the same outer minibatch; the Hessian-vector products of the N steps and the cross term
    each draw their own inner minibatch, so the outer direction is unbiased given z and v.
    The steps are constant by default (the paper's analysis uses constant steps).

    Args (besides StochasticSolver's; linear_step is beta, rho by default):
        inner_steps: T >= 1, SGD steps on z per iteration.
        linear_steps: N >= 1, SGD steps on v per iteration.
    """

    name = "amigo"

    def __init__(self, problem, *, inner_steps: int = 10, linear_steps: int = 10, **settings):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._set("linear_steps", linear_steps, validate.positive_int)

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        problem, x, z, v = self.problem, self._x, self._z, self._v
        for _ in range(self.settings["inner_steps"]):
            z.add_(problem.inner_gradient(x, z, self._draw_inner()), alpha=-inner_rate)
        outer_x, outer_z = problem.outer_gradients(x, z, self._draw_outer())
        for _ in range(self.settings["linear_steps"]):
            _, hessian_v, _ = problem.inner_products(x, z, v, self._draw_inner())
            v.add_(hessian_v + outer_z, alpha=-linear_rate)
        _, _, cross_v = problem.inner_products(x, z, v, self._draw_inner())
        x.add_(outer_x + cross_v, alpha=-outer_rate)
