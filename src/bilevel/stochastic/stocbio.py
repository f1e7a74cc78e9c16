"""StocBiO: warm-started inner SGD, then a stochastic Neumann series for the Hessian inverse."""

from __future__ import annotations

from .. import validate
from .solver import StochasticSolver, batch_size, non_negative_int


class StocBiO(StochasticSolver):
    """StocBiO: Ji, Yang & Liang, "Bilevel optimization: convergence analysis and enhanced
    design", ICML 2021, Algorithm 2 (StocBiO), with its Hessian-inverse-vector estimate
    (Algorithm 3).

    Each iteration, warm-started from the last z:

        D times:  z -= alpha grad_z g_S(x, z)                (a fresh inner minibatch each)
        draw D_F: b = grad_z f_{D_F}(x, z),  d = grad_x f_{D_F}(x, z)
        Neumann:  u = eta sum_{q=0..Q} prod_{j=1..q} (I - eta d2_zz g_{B_j}(x, z)) b
                  (Q independent Hessian minibatches B_j; u ~ [d2_zz G]^{-1} b)
        draw D_G: x -= beta (d - d2_xz g_{D_G}(x, z) u)

    In this package's sign convention v = -u, so the outer direction is d + d2_xz g v as for
    the other solvers; v is recomputed every iteration (nothing carried), and `v` reports the
    last one. Its expectation is the truncated series H^{-1} (I - (I - eta H)^{Q+1}) b: StocBiO's
    hypergradient is biased by (I - eta H)^{Q+1}, which vanishes as Q grows when eta is below
    1 / L (the Hessian's largest eigenvalue). Choices where the paper leaves room: the
    product's Q minibatches are applied in the order drawn (the series is built by the
    recursion r_q = (I - eta H_{B_q}) r_{q-1}, which has the paper's distribution), and d and b
    come from the one outer minibatch D_F as in the paper.

    Args (besides StochasticSolver's; linear_step is eta, the Neumann series' step, which
    inner_decay does not shrink: it is a parameter of the estimate, not a step in time):
        inner_steps: D >= 1, SGD steps on z per iteration.
        neumann_steps: Q >= 0, Hessian-vector products in the series (Q + 1 terms).
        hessian_batch: the size of each B_j (inner_batch by default).
    """

    name = "stocbio"

    def __init__(
        self,
        problem,
        *,
        inner_steps: int = 10,
        neumann_steps: int = 10,
        hessian_batch: int | None = None,
        **settings,
    ):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._set("neumann_steps", neumann_steps, non_negative_int)
        hessian_batch = self.settings["inner_batch"] if hessian_batch is None else hessian_batch
        self._set("hessian_batch", hessian_batch, batch_size, problem.n_inner, "n_inner")

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        # eta is the series' parameter, not a step along the iterations: it does not decay
        eta = self.settings["linear_step"]
        problem, x, z = self.problem, self._x, self._z
        for _ in range(self.settings["inner_steps"]):
            z.add_(problem.inner_gradient(x, z, self._draw_inner()), alpha=-inner_rate)
        outer_x, outer_z = problem.outer_gradients(x, z, self._draw_outer())
        term, total = outer_z, outer_z.clone()
        for _ in range(self.settings["neumann_steps"]):
            batch = self._draw_inner(self.settings["hessian_batch"])
            _, hessian_term, _ = problem.inner_products(x, z, term, batch)
            term = term - eta * hessian_term
            total.add_(term)
        self._v = total.mul_(-eta)
        _, _, cross_v = problem.inner_products(x, z, self._v, self._draw_inner())
        x.add_(outer_x + cross_v, alpha=-outer_rate)
