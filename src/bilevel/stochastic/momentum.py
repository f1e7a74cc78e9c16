"""MRBO and SUSTAIN: recursive momentum (STORM) on both directions, with a Neumann-series
hypergradient; the recursive-momentum update and its settings, which FSLA shares."""

from __future__ import annotations

from torch import Tensor

from .neumann import NeumannSolver
from .solver import fraction, non_negative


def recursive_momentum(direction: Tensor, new: Tensor, old: Tensor, weight: float) -> Tensor:
    """STORM's update a e_k + (1 - a)(d_{k-1} + e_k - e'_k) = e_k + (1 - a)(d_{k-1} - e'_k), where
    e_k and e'_k are the SAME minibatches' estimates at the new and the previous iterates.

    Given the past, its mean is E[e_k] + (1 - a)(d_{k-1} - E[e'_k]): the error of the previous
    direction, d_{k-1} - E[e'_k], is carried on shrunk by (1 - a), and the new noise is the
    difference of two estimates at nearby points (small) plus a times one estimate's."""
    return new + (1 - weight) * (direction - old)


class MomentumSettings:
    """The weight a_k = momentum * k^-momentum_decay of the newest estimate, for a solver with
    recursive momentum (mixed into a StochasticSolver subclass, which calls `_set_momentum`)."""

    def _set_momentum(self, momentum: float, momentum_decay: float) -> None:
        self._set("momentum", momentum, fraction)
        self._set("momentum_decay", momentum_decay, non_negative)

    def _momentum_weight(self) -> float:
        return self.settings["momentum"] * self.iteration ** -self.settings["momentum_decay"]


class _DoubleMomentum(MomentumSettings, NeumannSolver):
    """Recursive momentum on the z-direction u (grad_z g) and the x-direction d (the Neumann
    hypergradient estimate), both drawn from one NeumannSample evaluated at (x_k, z_k) and at
    the previous iterates (x_{k-1}, z_{k-1}); then z and x step together:

        u_k = e^z_k + (1 - a_k)(u_{k-1} - e'^z_k),   d_k = e^x_k + (1 - a_k)(d_{k-1} - e'^x_k)
        z_{k+1} = z_k - rho_k u_k,                  x_{k+1} = x_k - gamma_k d_k

    The first iteration has no previous iterates: u_1, d_1 are its plain estimates."""

    def _start_directions(self) -> None:
        self._directions = [self._z.new_zeros(self._z.shape), self._x.new_zeros(self._x.shape)]
        self._previous: list[Tensor] = []  # [x_{k-1}, z_{k-1}], empty before the first step

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        sample = self._draw_sample()
        new = self._estimate(sample, self._x, self._z)
        if self._previous:
            old = self._estimate(sample, *self._previous)
            weight = self._momentum_weight()
            inner, outer = self._directions
            self._directions = [
                recursive_momentum(inner, new.inner, old.inner, weight),
                recursive_momentum(outer, new.outer, old.outer, weight),
            ]
        else:
            self._directions = [new.inner, new.outer]
        self._v = new.v
        self._previous = [self._x.clone(), self._z.clone()]
        self._z.add_(self._directions[0], alpha=-inner_rate)
        self._x.add_(self._directions[1], alpha=-outer_rate)

    def _memory(self) -> dict:
        return {"directions": self._directions, "previous": self._previous}

    def _load_memory(self, memory: dict) -> None:
        self._directions, self._previous = memory["directions"], memory["previous"]


class MRBO(_DoubleMomentum):
    """MRBO, the Momentum-based Recursive Bilevel Optimizer: Yang, Ji & Liang, "Provably faster
    algorithms for bilevel optimization", NeurIPS 2021, Algorithm 1 (MRBO).

    Recursive momentum (STORM) on the inner gradient u and the hypergradient estimate d, each
    new estimate and its value at the previous iterates from the same minibatches:

        u_k = b_k grad_z g_B(x_k, z_k) + (1 - b_k)(u_{k-1} + grad_z g_B(x_k, z_k)
                                                          - grad_z g_B(x_{k-1}, z_{k-1}))
        d_k = a_k Phi_S(x_k, z_k) + (1 - a_k)(d_{k-1} + Phi_S(x_k, z_k) - Phi_S(x_{k-1}, z_{k-1}))
        z_{k+1} = z_k - rho_k u_k,   x_{k+1} = x_k - gamma_k d_k

    where Phi_S = grad_x f_J + d2_xz g_B v, v = -eta sum_{q=0..Q} prod_{j=1..q} (I - eta
    d2_zz g_{B_j}) grad_z f_J is StocBiO's Neumann estimate (Q Hessian minibatches). The paper's
    schedule: steps proportional to eta_k = (m + k)^-1/3 and momentum weights a_k, b_k
    proportional to eta_k^2 (inner_decay = outer_decay = 1/3, momentum_decay = 2/3 here).

    Choices where the paper leaves room: one weight a_k = b_k = momentum * k^-momentum_decay
    for both recursions (the paper's constants c_1, c_2 may differ); the first iteration takes
    the plain estimates at the ordinary batch sizes (the paper's initial batch may be larger);
    the cross term shares u's minibatch B, which is independent of the Hessian minibatches, so
    the estimate stays unbiased for its truncated series. Samples are counted once though each
    is evaluated at two points. `v` reports the last estimate's v.

    Args (besides StochasticSolver's; linear_step is eta, which inner_decay does not shrink):
        momentum: the weight in (0, 1] of the newest estimate (1: no momentum, plain SGD on
            StocBiO's estimate with one inner step).
        momentum_decay: its decay exponent (>= 0): a_k = momentum * k^-momentum_decay.
        neumann_steps: Q >= 0, Hessian-vector products in the series (Q + 1 terms).
        hessian_batch: the size of each B_j (inner_batch by default).
    """

    name = "mrbo"

    def __init__(
        self,
        problem,
        *,
        momentum: float = 0.5,
        momentum_decay: float = 0.0,
        neumann_steps: int = 10,
        hessian_batch: int | None = None,
        **settings,
    ):
        super().__init__(problem, **settings)
        self._set_momentum(momentum, momentum_decay)
        self._set_series(True, neumann_steps, hessian_batch)
        self._start_directions()


class SUSTAIN(_DoubleMomentum):
    """SUSTAIN: Khanduri, Zeng, Hong, Wai, Wang & Yang, "A near-optimal algorithm for stochastic
    bilevel optimization via double-momentum", NeurIPS 2021, Algorithm 1 (SUSTAIN).

    Double momentum: recursive momentum (STORM) on the inner gradient h_g and on the hypergradient
    estimate h_f, each new estimate and its value at the previous iterates from the same
    samples:

        x_{t+1} = x_t - alpha_t h_f^t,   z_{t+1} = z_t - beta_t h_g^t
        h_g^{t+1} = eta^g grad_z g_B(x_{t+1}, z_{t+1})
                    + (1 - eta^g)(h_g^t + grad_z g_B(x_{t+1}, z_{t+1}) - grad_z g_B(x_t, z_t))
        h_f^{t+1} = eta^f Phi_S(x_{t+1}, z_{t+1})
                    + (1 - eta^f)(h_f^t + Phi_S(x_{t+1}, z_{t+1}) - Phi_S(x_t, z_t))

    with Phi_S = grad_x f_J + d2_xz g_B v and Ghadimi & Wang's randomly truncated series
    v = -eta N prod_{i=1..p} (I - eta d2_zz g_{B_i}) grad_z f_J, p ~ U{0, ..., N - 1} (the same p
    and minibatches at both points). The paper's schedule: alpha_t = (w + t)^-1/3, beta_t
    proportional to alpha_t, eta^f, eta^g proportional to alpha_t^2 (inner_decay = outer_decay
    = 1/3, momentum_decay = 2/3 here). This is MRBO's iteration with the other series (the two
    papers appeared together).

    Choices where the paper leaves room: one weight eta^f = eta^g = momentum *
    k^-momentum_decay; the first directions are plain estimates at the ordinary batch sizes;
    the cross term shares h_g's inner minibatch B (independent of the B_i). Samples are counted
    once though each is evaluated at two points. `v` reports the last estimate's v.

    Args (besides StochasticSolver's; linear_step is eta, which inner_decay does not shrink):
        momentum: the weight in (0, 1] of the newest estimate.
        momentum_decay: its decay exponent (>= 0).
        neumann_terms: N >= 1, the number of terms the random truncation averages over.
        hessian_batch: the size of each B_i (inner_batch by default).
    """

    name = "sustain"

    def __init__(
        self,
        problem,
        *,
        momentum: float = 0.5,
        momentum_decay: float = 0.0,
        neumann_terms: int = 10,
        hessian_batch: int | None = None,
        **settings,
    ):
        super().__init__(problem, **settings)
        self._set_momentum(momentum, momentum_decay)
        self._set_series(False, neumann_terms, hessian_batch)
        self._start_directions()
