"""VRBO: SARAH/SPIDER recursive estimates of the inner gradient and of a Neumann hypergradient,
refreshed on large batches, with an inner loop on z at each x."""

from __future__ import annotations

from torch import Tensor

from .. import validate
from .neumann import NeumannSolver
from .solver import batch_size


class VRBO(NeumannSolver):
    """VRBO, the Variance Reduction Bilevel Optimizer: Yang, Ji & Liang, "Provably faster
    algorithms for bilevel optimization", NeurIPS 2021, Algorithm 2 (VRBO).

    u estimates grad_z G and w the hypergradient Phi (StocBiO's Neumann estimate, as in MRBO)
    at the current iterates. Every `period` iterations both are recomputed on large batches;
    each iteration then moves x once and z `inner_steps` times, and after every move corrects
    u and w by the change of a fresh minibatch's estimates (the same minibatches at the old and
    the new point, SARAH/SPIDER):

        k = 0 mod q:  u = grad_z g_S1(x_k, z_k),   w = Phi_S1(x_k, z_k)      (large batches S1)
        x_{k+1} = x_k - gamma w;   (u, w) += e_S(x_{k+1}, z_k) - e_S(x_k, z_k)
        m times:  z' = z - beta u;  (u, w) += e_S(x_{k+1}, z') - e_S(x_{k+1}, z);  z = z'
        z_{k+1} = z

    with e_S = (grad_z g_B, Phi_S), Phi_S = grad_x f_J + d2_xz g_B v, v = -eta sum_{q=0..Q}
    prod_{j=1..q} (I - eta d2_zz g_{B_j}) grad_z f_J, S = (B, J, B_1..B_Q) fresh at each
    correction.

    Choices where the paper leaves room: the paper's inner loop (t = 0..m, the first
    correction taking x's move) ends with one more z step after the last correction, so its
    z_{k+1} is one step past the point u and w estimate (the authors' code does the same); here
    every move, the last included, is followed by its correction, so u and w always estimate
    at the current (x, z) and their error stays a martingale. `inner_steps` counts the z
    steps. The large batches are the whole data by default (also for the Hessians of the
    refreshed series, which the large inner batch serves); steps are constant (the paper's).
    `v` reports the last correction's v at the current point.

    Args (besides StochasticSolver's; linear_step is eta, which inner_decay does not shrink):
        inner_steps: m >= 1, z steps (each with a correction) per iteration.
        period: q >= 1, iterations between refreshes on the large batches (the first refreshes).
        large_inner_batch, large_outer_batch: the refreshes' batch sizes (None: all the samples).
        neumann_steps: Q >= 0, Hessian-vector products in each series (Q + 1 terms).
        hessian_batch: the size of each B_j outside the refreshes (inner_batch by default).
    """

    name = "vrbo"

    def __init__(
        self,
        problem,
        *,
        inner_steps: int = 3,
        period: int = 10,
        large_inner_batch: int | None = None,
        large_outer_batch: int | None = None,
        neumann_steps: int = 10,
        hessian_batch: int | None = None,
        **settings,
    ):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._set("period", period, validate.positive_int)
        for name, size, n, n_name in (
            ("large_inner_batch", large_inner_batch, problem.n_inner, "n_inner"),
            ("large_outer_batch", large_outer_batch, problem.n_outer, "n_outer"),
        ):
            self._set(name, n if size is None else size, batch_size, n, n_name)
        self._set_series(True, neumann_steps, hessian_batch)
        self._directions = [self._z.new_zeros(self._z.shape), self._x.new_zeros(self._x.shape)]

    def _refresh(self) -> None:
        s = self.settings
        large = s["large_inner_batch"]
        estimate = self._estimate(
            self._draw_sample(large, s["large_outer_batch"], large), self._x, self._z
        )
        self._directions, self._v = [estimate.inner, estimate.outer], estimate.v

    def _correct(self, previous: list[Tensor]) -> None:
        """Add a fresh minibatch's change of estimates from `previous` [x, z] to the current."""
        sample = self._draw_sample()
        new = self._estimate(sample, self._x, self._z)
        old = self._estimate(sample, *previous)
        self._directions = [
            d + n - o
            for d, n, o in zip(self._directions, (new.inner, new.outer), (old.inner, old.outer))
        ]
        self._v = new.v

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        if (self.iteration - 1) % self.settings["period"] == 0:
            self._refresh()
        previous = [self._x.clone(), self._z.clone()]
        self._x.add_(self._directions[1], alpha=-outer_rate)
        self._correct(previous)
        for _ in range(self.settings["inner_steps"]):
            previous = [self._x.clone(), self._z.clone()]
            self._z.add_(self._directions[0], alpha=-inner_rate)
            self._correct(previous)

    def _memory(self) -> dict:
        return {"directions": self._directions}

    def _load_memory(self, memory: dict) -> None:
        self._directions = memory["directions"]
