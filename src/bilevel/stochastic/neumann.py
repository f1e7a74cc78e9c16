"""Hypergradient estimates by a Neumann series for the inverse Hessian, on frozen minibatches.

Solvers without a linear-system iterate (TTSA, BSA, MRBO, VRBO, SUSTAIN) estimate

    v = -[d2_zz G]^{-1} grad_z F   by   v = -eta * S,   S ~ sum_{q>=0} (I - eta d2_zz G)^q grad_z F

with independent minibatch Hessians in the products, then the direction grad_x f_J + d2_xz g_B v.
Two estimators of the series S are in use:

- "summed" (Ji, Yang & Liang's, StocBiO's and MRBO/VRBO's): S = sum_{q=0..Q} r_q,
  r_q = (I - eta H_{B_q}) r_{q-1}, r_0 = b; its mean is the series truncated after Q + 1 terms.
- "random" (Ghadimi & Wang's, TTSA's, BSA's and SUSTAIN's): S = N prod_{i=1..p} (I - eta H_{B_i}) b
  with p uniform in {0, ..., N - 1}; its mean is also the series truncated after N terms,
  (1/N) sum_p N (I - eta H)^p b, at one product of p factors instead of a sum of Q.

Either way the mean is H^{-1} (I - (I - eta H)^T) b with T terms: the bias (I - eta H)^T shrinks
geometrically when eta < 2 / L (L the largest eigenvalue of every minibatch Hessian).

A NeumannSample holds every minibatch (and p) of one estimate, so the recursive solvers can
evaluate the same estimate at two points (their variance reduction differences it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import validate
from .solver import StochasticSolver, batch_size, non_negative_int


@dataclass
class NeumannSample:
    """The minibatches of one hypergradient estimate.

    Attributes:
        inner: B_0, for grad_z g and the cross term d2_xz g v.
        outer: J, for grad_x f and grad_z f.
        hessians: B_1, B_2, ..., one per factor (I - eta H_{B_i}) of the products.
        summed: True for the summed series, False for the randomly truncated product.
        scale: the factor on the series (1 summed, N for the random truncation).
    """

    inner: Tensor
    outer: Tensor
    hessians: list[Tensor]
    summed: bool
    scale: float


@dataclass
class Estimate:
    """One hypergradient estimate at (x, z): grad_z g_B0 (the inner direction), the x-direction
    grad_x f_J + d2_xz g_B0 v, and v itself."""

    inner: Tensor
    outer: Tensor
    v: Tensor


def neumann_estimate(problem, x: Tensor, z: Tensor, sample: NeumannSample, eta: float) -> Estimate:
    """The estimate of `sample` at (x, z) with the series' step `eta`: one Hessian-vector product
    per factor, one double backward for grad_z g and the cross term, one outer gradient."""
    outer_x, outer_z = problem.outer_gradients(x, z, sample.outer)
    term = outer_z
    total = outer_z.clone()
    for batch in sample.hessians:
        _, hessian_term, _ = problem.inner_products(x, z, term, batch)
        term = term - eta * hessian_term
        total.add_(term)
    v = (total if sample.summed else term).mul(-eta * sample.scale)
    gradient, _, cross_v = problem.inner_products(x, z, v, sample.inner)
    return Estimate(gradient, outer_x + cross_v, v)


class NeumannSolver(StochasticSolver):
    """The part a solver with a Neumann-series hypergradient shares: its settings, the draw of a
    NeumannSample and its evaluation. `linear_step` is the series' step eta (not decayed: it is
    a parameter of the estimate, not a step in time). Subclasses call `_set_series` in their
    constructor."""

    def _set_series(self, summed: bool, terms: int, hessian_batch: int | None) -> None:
        """Check and store the series' settings: Q = `neumann_steps` >= 0 products (Q + 1 terms)
        when summed, N = `neumann_terms` >= 1 terms when randomly truncated; `hessian_batch`
        (inner_batch when None) is the size of each B_i."""
        if summed:
            self._set("neumann_steps", terms, non_negative_int)
        else:
            self._set("neumann_terms", terms, validate.positive_int)
        self._summed = summed
        size = self.settings["inner_batch"] if hessian_batch is None else hessian_batch
        self._set("hessian_batch", size, batch_size, self.problem.n_inner, "n_inner")

    def _batch(self, side: str, size: int) -> Tensor:
        """A minibatch of `size` samples of the `side` ("inner" or "outer") data; the whole data,
        in order and without a draw, when `size` is all of it."""
        n = self.problem.n_inner if side == "inner" else self.problem.n_outer
        if size == n:
            self.samples[side] += n
            return self.problem.everything(n)
        return self._draw_inner(size) if side == "inner" else self._draw_outer(size)

    def _draw_sample(
        self,
        inner_batch: int | None = None,
        outer_batch: int | None = None,
        hessian_batch: int | None = None,
    ) -> NeumannSample:
        """Every minibatch of one estimate (the settings' sizes unless given), and, for the
        random truncation, its number of factors p uniform in {0, ..., N - 1}."""
        s = self.settings
        inner = self._batch("inner", inner_batch or s["inner_batch"])
        outer = self._batch("outer", outer_batch or s["outer_batch"])
        if self._summed:
            factors, scale = s["neumann_steps"], 1.0
        else:
            factors, scale = self.sampler.index(s["neumann_terms"]), float(s["neumann_terms"])
        size = hessian_batch or s["hessian_batch"]
        hessians = [self._batch("inner", size) for _ in range(factors)]
        return NeumannSample(inner, outer, hessians, self._summed, scale)

    def _estimate(self, sample: NeumannSample, x: Tensor, z: Tensor) -> Estimate:
        return neumann_estimate(self.problem, x, z, sample, self.settings["linear_step"])
