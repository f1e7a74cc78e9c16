"""TTSA and BSA: SGD on z, then an x step along Ghadimi & Wang's randomly truncated Neumann
estimate of the hypergradient."""

from __future__ import annotations

from .. import validate
from .neumann import NeumannSolver


class _SGDThenNeumann(NeumannSolver):
    """`_inner_steps` SGD steps on z (warm-started from the last z), then one x step along the
    randomly truncated Neumann estimate at the new z."""

    _inner_steps = 1

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        problem, x, z = self.problem, self._x, self._z
        for _ in range(self._inner_steps):
            z.add_(problem.inner_gradient(x, z, self._draw_inner()), alpha=-inner_rate)
        estimate = self._estimate(self._draw_sample(), x, z)
        self._v = estimate.v
        x.add_(estimate.outer, alpha=-outer_rate)


class TTSA(_SGDThenNeumann):
    """TTSA, the Two-Timescale Stochastic Approximation: Hong, Wai, Wang & Yang, "A two-timescale
    stochastic algorithm framework for bilevel optimization: complexity analysis and
    application to actor-critic", SIAM J. Optim. 33(1), 2023, Algorithm 1 (TTSA).

    One SGD step on z, then one step on x along the hypergradient estimate at the NEW z (the
    paper's h_f^k is taken at (x_k, y_{k+1})):

        z_{k+1} = z_k - beta_k grad_z g_B(x_k, z_k)
        x_{k+1} = x_k - alpha_k [grad_x f_J + d2_xz g_B0 v],   at (x_k, z_{k+1})
        v = -eta N prod_{i=1..p} (I - eta d2_zz g_{B_i}) grad_z f_J,   p ~ U{0, ..., N - 1}

    (eta = c_h / L_g in the paper, N = t_max). The two time scales are the step schedules:
    the paper's analysis takes beta_k ~ k^-2/5 and alpha_k ~ k^-3/5 (inner_decay=0.4,
    outer_decay=0.6) for a non-convex outer problem; constant steps are the default here.

    Choices where the paper leaves room: x is unconstrained (the paper's projection onto X is
    the identity); N is a constant setting (the paper grows t_max(k) like log k, which only
    shrinks the bias (I - eta H)^N further); B, B_0, the B_i and J are independent minibatches
    (the paper's single sample xi_0 serves grad_x f, grad_z f and the cross term; with separate
    inner and outer data, the cross term's batch is drawn from the inner samples). `v` reports
    the last estimate's v.

    Args (besides StochasticSolver's; linear_step is eta, which inner_decay does not shrink):
        neumann_terms: N >= 1, the number of terms the random truncation averages over.
        hessian_batch: the size of each B_i (inner_batch by default).
    """

    name = "ttsa"

    def __init__(
        self, problem, *, neumann_terms: int = 10, hessian_batch: int | None = None, **settings
    ):
        super().__init__(problem, **settings)
        self._set_series(False, neumann_terms, hessian_batch)


class BSA(_SGDThenNeumann):
    """BSA, Bilevel Stochastic Approximation: Ghadimi & Wang, "Approximation methods for bilevel
    programming", arXiv:1802.02246 (2018), Algorithm 2 (BSA), with the hypergradient estimate
    of their Section 3 (a randomly truncated Neumann series).

    Each iteration runs an inner SGD loop, then one x step at its output:

        T times:  z -= beta grad_z g_B(x, z)              (a fresh inner minibatch each)
        x -= alpha [grad_x f_J + d2_xz g_B0 v],   v = -eta N prod_{i=1..p} (I - eta d2_zz g_{B_i})
                                                          grad_z f_J,   p ~ U{0, ..., N - 1}

    (eta = 1 / L_g in the paper.) Choices where the paper leaves room: the number of inner
    steps T is a constant setting (the paper's analysis grows t_k like sqrt(k + 1)), and each
    inner loop starts from the last one's z (warm start: with a constant T, a loop restarted
    from a fixed point would keep a bias that never vanishes); the inner step is constant
    within a loop (the paper's beta_t decreases within it) and follows the frame's schedule
    across iterations; the minibatches are independent as in TTSA. BSA with T = 1 is TTSA.

    Args (besides StochasticSolver's; linear_step is eta, which inner_decay does not shrink):
        inner_steps: T >= 1, SGD steps on z per iteration.
        neumann_terms: N >= 1, the number of terms the random truncation averages over.
        hessian_batch: the size of each B_i (inner_batch by default).
    """

    name = "bsa"

    def __init__(
        self,
        problem,
        *,
        inner_steps: int = 10,
        neumann_terms: int = 10,
        hessian_batch: int | None = None,
        **settings,
    ):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._inner_steps = self.settings["inner_steps"]
        self._set_series(False, neumann_terms, hessian_batch)
