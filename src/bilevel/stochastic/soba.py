"""SOBA and MA-SOBA: single-loop stochastic bilevel algorithms that move z, v and x together."""

from __future__ import annotations

from torch import Tensor

from .problem import StochasticProblem
from .solver import StochasticSolver, fraction, positive


def directions(
    problem: StochasticProblem, x: Tensor, z: Tensor, v: Tensor, inner: Tensor, outer: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """SOBA's three directions at (x, z, v) on the minibatches `inner` and `outer`:
    (grad_z g, d2_zz g v + grad_z f, d2_xz g v + grad_x f), one double backward and one
    outer gradient."""
    gradient, hessian_v, cross_v = problem.inner_products(x, z, v, inner)
    outer_x, outer_z = problem.outer_gradients(x, z, outer)
    return gradient, hessian_v + outer_z, cross_v + outer_x


def project_onto_ball(vector: Tensor, radius: float | None) -> None:
    """Scale `vector` in place onto the ball of `radius` around 0 if it lies outside (nothing for
    radius None)."""
    if radius is not None:
        vector.mul_((radius / vector.norm()).clamp(max=1.0))


class SOBA(StochasticSolver):
    """SOBA, the StOchastic Bilevel Algorithm: Dagreou, Ablin, Vaiter & Moreau, "A framework for
    bilevel optimization that enables stochastic and global variance reduction algorithms",
    NeurIPS 2022, Algorithm 1 (SOBA).

    Every iteration draws one inner minibatch B and one outer minibatch J and moves z, v and x
    at once along unbiased estimates of three directions, all taken at the current (x, z, v):

        D_z = grad_z g_B(x, z)                          (the inner gradient)
        D_v = d2_zz g_B(x, z) v + grad_z f_J(x, z)      (the linear system's residual)
        D_x = d2_xz g_B(x, z) v + grad_x f_J(x, z)      (the hypergradient at v)
        z -= rho D_z,   v -= rho D_v,   x -= gamma D_x

    Choices where the paper leaves room: the same minibatch B serves the three inner
    products (one double backward gives all three) and J both outer gradients, as the paper's
    single draw of (i, j) per iteration does; minibatches are drawn without replacement within
    a batch, independently across iterations; v starts at zero. The paper's analysis uses
    decreasing steps rho_k ~ k^-2/5, gamma_k ~ k^-3/5 (inner_decay=0.4, outer_decay=0.6);
    constant steps are the default. The step on v is `linear_step` (rho by default).
    Settings: those of StochasticSolver.
    """

    name = "soba"

    def _directions(self) -> tuple[Tensor, Tensor, Tensor]:
        """(D_z, D_v, D_x) from one inner and one outer minibatch."""
        inner, outer = self._draw_inner(), self._draw_outer()
        return directions(self.problem, self._x, self._z, self._v, inner, outer)

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        d_z, d_v, d_x = self._directions()
        self._z.add_(d_z, alpha=-inner_rate)
        self._v.add_(d_v, alpha=-linear_rate)
        self._x.add_(d_x, alpha=-outer_rate)


class MASOBA(SOBA):
    """MA-SOBA, SOBA with a moving average of the hypergradient estimates: Chen, Xiao &
    Balasubramanian, "Optimal algorithms for stochastic bilevel optimization under relaxed
    smoothness conditions", arXiv:2306.12067 (2023), Algorithm 1 (MA-SOBA).

    The directions are SOBA's, at the current (x, z, v); x moves along the running average h of
    the D_x drawn so far instead of the last one, which removes SOBA's need for higher-order
    smoothness in the analysis:

        z -= beta D_z,   v = Proj_radius(v - beta_v D_v),   x -= alpha h,
        h = (1 - theta) h + theta D_x

    Choices: h starts at zero (so the first step leaves x in place); x moves along the average
    from BEFORE this iteration's draw, as in the paper's listing; the projection of v onto the
    ball of radius `radius` (the paper's analysis bounds v by it, rho = L_f / mu_g) is applied
    only when a radius is given. The paper's theta is constant, as here. The brief that asked
    for this solver named its authors "Chen, Xu & Zhang"; the paper of this algorithm is by
    Xuxing Chen, Tesi Xiao and Krishnakumar Balasubramanian.

    Args (besides StochasticSolver's):
        averaging: theta in (0, 1], the weight of the newest D_x in h.
        radius: the radius of the ball v is projected onto, or None (no projection).
    """

    name = "ma-soba"

    def __init__(self, problem, *, averaging: float = 0.1, radius: float | None = None, **settings):
        super().__init__(problem, **settings)
        self._set("averaging", averaging, fraction)
        self.settings["radius"] = (
            None if radius is None else self._check("radius", radius, positive)
        )
        self._h = self._x.new_zeros(self._x.shape)

    @property
    def average(self) -> dict[str, Tensor]:
        """h, the moving average of the hypergradient estimates (the x-direction of the next
        step), with x's structure."""
        return {k: t.clone() for k, t in self.problem.x_layout.unflatten(self._h).items()}

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        d_z, d_v, d_x = self._directions()
        theta, radius = self.settings["averaging"], self.settings["radius"]
        self._z.add_(d_z, alpha=-inner_rate)
        self._v.add_(d_v, alpha=-linear_rate)
        project_onto_ball(self._v, radius)
        self._x.add_(self._h, alpha=-outer_rate)
        self._h.mul_(1 - theta).add_(d_x, alpha=theta)

    def _memory(self) -> dict:
        return {"average": self._h}

    def _load_memory(self, memory: dict) -> None:
        self._h = memory["average"]
