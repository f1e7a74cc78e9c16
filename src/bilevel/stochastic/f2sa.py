"""F2SA: a fully first-order penalty method with two inner sequences and a growing multiplier."""

from __future__ import annotations

from torch import Tensor

from .. import validate
from .solver import StochasticSolver, non_negative, positive


class F2SA(StochasticSolver):
    """F2SA, Fully First-order Stochastic Approximation: Kwon, Kwon, Wright & Nowak, "A fully
    first-order method for stochastic bilevel optimization", ICML 2023, Algorithm 1 (F2SA).

    The bilevel problem is relaxed into the penalty (Lagrangian) problem

        min_x max_z min_y  L_lam(x, y, z) = F(x, y) + lam (G(x, y) - G(x, z)),

    whose value function approaches h(x) as lam grows (|grad - grad h| = O(1/lam)): z tracks
    z*(x) = argmin G(x, .), y tracks y*_lam(x) = argmin F/lam + G, and x moves along
    grad_x L_lam, which needs only gradients. Each iteration k (lam = lam_k), warm-started
    from the last z and y:

        T times:  z -= rho grad_z g_B(x, z)
                  y -= (alpha / lam) (grad_z f_J(x, y) + lam grad_z g_B(x, y))
        then:     x -= gamma (grad_x f_J'(x, y) + lam (grad_x g_B'(x, y) - grad_x g_B'(x, z)))

    rho is inner_step and alpha linear_step (inner_step by default), both decayed by
    inner_decay; gamma is outer_step (outer_decay); lam_k = penalty k^penalty_growth. The
    paper writes y's step as alpha_k on grad f + lam grad g and ties lam_k = gamma_k / alpha_k
    (up to a constant) in its analysis, so that y's step on G is z's; here y's step is written
    alpha / lam so that alpha is y's step on G whatever lam is (the paper's coupling when
    alpha = rho), and the paper's x step xi alpha_k is outer_step k^-outer_decay. Its
    lam_{k+1} = lam_k + delta_k follows that schedule: with its y and z steps decaying as
    k^-a and k^-c, set outer_decay=a, inner_decay=c and penalty_growth=a-c.

    Choices where the paper leaves room: at each inner step z and y take their G-gradient on
    ONE inner minibatch B (the paper's samples for z and y are independent). Common samples
    make the noise of y and z nearly the same, so y - z, which lam multiplies in the x step,
    is far less noisy: on the test quadratic (batches of 32, lam = 10 k^0.5, decays 0.4 and
    0.6, 300 iterations, three seeds) the error to x* was 1.1-2.1% with one batch against
    13-27% with two. The x step evaluates
    grad_x g at y and at z on one inner minibatch B' for the same reason, and grad_x f on an
    outer minibatch J'; y's grad_z f draws its own outer minibatch J at each inner step. The
    frame's v reports lam (y - z), which tends to v*(x) = -[d2_zz G]^{-1} grad_z F as lam grows
    (y*_lam - z* = v*/lam + O(1/lam^2)): lam (grad_x g(x, y) - grad_x g(x, z)) is the
    first-order stand-in for d2_xz G v. Samples: every gradient counts its batch, so B and B'
    count twice (two evaluations on each).

    Args (besides StochasticSolver's):
        inner_steps: T >= 1, steps on z and y per iteration.
        penalty: lam_1 > 0.
        penalty_growth: the exponent p >= 0 of lam_k = penalty k^p (0: a constant multiplier,
            whose fixed point is O(1/penalty) from x*; the default 0.5 grows it).
    """

    name = "f2sa"

    def __init__(
        self,
        problem,
        *,
        inner_steps: int = 10,
        penalty: float = 10.0,
        penalty_growth: float = 0.5,
        **settings,
    ):
        super().__init__(problem, **settings)
        self._set("inner_steps", inner_steps, validate.positive_int)
        self._set("penalty", penalty, positive)
        self._set("penalty_growth", penalty_growth, non_negative)
        self._y = self._z.clone()

    @property
    def y(self) -> dict[str, Tensor]:
        """The penalised inner sequence y (approximates argmin F/lam + G), with z's structure."""
        return {k: t.clone() for k, t in self.problem.z_layout.unflatten(self._y).items()}

    def multiplier(self, iteration: int) -> float:
        """lam_k = penalty k^penalty_growth at iteration k >= 1."""
        return self.settings["penalty"] * iteration ** self.settings["penalty_growth"]

    def _advance(self, inner_rate: float, linear_rate: float, outer_rate: float) -> None:
        problem, x, z, y = self.problem, self._x, self._z, self._y
        lam = self.multiplier(self.iteration)
        for _ in range(self.settings["inner_steps"]):
            batch = self._draw_inner()
            self.samples["inner"] += len(batch)  # g is evaluated twice on it, at z and at y
            z.add_(problem.inner_gradient(x, z, batch), alpha=-inner_rate)
            _, outer_y = problem.outer_gradients(x, y, self._draw_outer())
            inner_y = problem.inner_gradient(x, y, batch)
            y.add_(inner_y.add_(outer_y, alpha=1 / lam), alpha=-linear_rate)
        batch = self._draw_inner()
        self.samples["inner"] += len(batch)  # g is evaluated twice on it, at y and at z
        inner_x_y, _ = problem.inner_gradients(x, y, batch)
        inner_x_z, _ = problem.inner_gradients(x, z, batch)
        outer_x, _ = problem.outer_gradients(x, y, self._draw_outer())
        x.add_(outer_x + lam * (inner_x_y - inner_x_z), alpha=-outer_rate)
        self._v = lam * (y - z)

    def _memory(self) -> dict:
        return {"y": self._y}

    def _load_memory(self, memory: dict) -> None:
        self._y = memory["y"]
