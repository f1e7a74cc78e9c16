"""Benchmark problems with a closed-form value function, to measure solvers exactly."""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import StochasticProblem


class QuadraticProblem(StochasticProblem):
    """A quadratic bilevel problem whose value function h, its minimiser and its gradient are
    known by linear solves, so h(x) - h* and ||grad h(x)||^2 are exact.

    Per inner sample i (a_i in R^dz) and outer sample j (c_j in R^dz, y_j in R, e_j in R^dx):

        g_i(x, z) = 1/2 z^T A_i z - z^T B_i x,   A_i = a_i a_i^T + mu_inner I,  B_i = a_i a_i^T K
                  = 1/2 (a_i^T (z - K x))^2 + mu_inner/2 ||z||^2 - 1/2 (a_i^T K x)^2
        f_j(x, z) = 1/2 (c_j^T z - y_j)^2 + mu_outer/2 ||x||^2 + e_j^T x

    a ridge regression of z towards K x inside, a least-squares fit of z to (c_j, y_j) outside
    (y_j = c_j^T z_true + 0.1 noise), a ridge penalty and a small per-sample linear term on x.
    K (dz x dx), c_j and z_true have N(0, 1/dz), N(0, 1) and N(0, 1) entries, e_j N(0, 0.01/dx).

    Conditioning: ||a_i||^2 = smooth_inner - mu_inner, so EVERY g_i is mu_inner-strongly convex
    and smooth_inner-smooth in z (the eigenvalues of each A_i and of their mean lie in
    [mu_inner, smooth_inner]); SGD on z with a single sample is stable for steps below
    2 / smooth_inner. The value function is a strongly convex quadratic (P >= mu_outer I):

        z*(x) = M x,  M = Abar^{-1} Bbar;      v*(x) = -Abar^{-1} (Cbar z*(x) - r)
        h(x) = 1/2 x^T P x - q^T x + 1/2 mean(y^2),  P = M^T Cbar M + mu_outer I,
        q = M^T r - ebar,  grad h(x) = P x - q,  x* = P^{-1} q,  h* = h(x*)

    with Abar, Bbar the means of A_i, B_i, Cbar = mean c_j c_j^T, r = mean y_j c_j, ebar =
    mean e_j. The variables are {"x": (dim_outer,)} and {"z": (dim_inner,)}, starting at zero.

    Args:
        n_inner: the number of inner samples.
        n_outer: the number of outer samples.
        dim_inner: the size of z.
        dim_outer: the size of x.
        mu_inner: the inner strong convexity, 0 < mu_inner < smooth_inner.
        smooth_inner: the inner smoothness.
        mu_outer: the ridge penalty on x in f (> 0 makes h strongly convex).
        seed: seeds the data (its own generator: the global one is untouched).
        dtype: of the data and variables.
        device: of the data and variables.
    """

    def __init__(
        self,
        *,
        n_inner: int = 256,
        n_outer: int = 128,
        dim_inner: int = 10,
        dim_outer: int = 5,
        mu_inner: float = 0.1,
        smooth_inner: float = 1.0,
        mu_outer: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        if not 0 < mu_inner < smooth_inner:
            raise ValueError(
                f"need 0 < mu_inner < smooth_inner, got mu_inner={mu_inner!r}, "
                f"smooth_inner={smooth_inner!r}"
            )
        if not mu_outer > 0:
            raise ValueError(f"mu_outer must be > 0 (h strongly convex), got {mu_outer!r}")
        generator = torch.Generator().manual_seed(seed)

        def normal(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        a = normal(n_inner, dim_inner)
        a *= ((smooth_inner - mu_inner) / (a**2).sum(1, keepdim=True)).sqrt()
        coupling = normal(dim_inner, dim_outer) / dim_inner**0.5  # K
        c = normal(n_outer, dim_inner)
        data = {
            "a": a,
            "b": a @ coupling,  # b_i = K^T a_i, so B_i = a_i b_i^T
            "c": c,
            "y": c @ normal(dim_inner) + 0.1 * normal(n_outer),
            "e": 0.1 * normal(n_outer, dim_outer) / dim_outer**0.5,
        }
        for key, value in data.items():
            setattr(self, key, value.to(dtype=dtype, device=device))
        self.mu_inner, self.mu_outer = float(mu_inner), float(mu_outer)
        x = {"x": torch.zeros(dim_outer, dtype=dtype, device=device)}
        z = {"z": torch.zeros(dim_inner, dtype=dtype, device=device)}
        super().__init__(self._inner, self._outer, x, z, n_inner, n_outer)
        self._closed_form()

    def _inner(self, x, z, batch):
        az = self.a[batch] @ z["z"]
        bx = self.b[batch] @ x["x"]
        return (0.5 * az**2 - az * bx).mean() + 0.5 * self.mu_inner * (z["z"] ** 2).sum()

    def _outer(self, x, z, batch):
        residual = self.c[batch] @ z["z"] - self.y[batch]
        linear = self.e[batch] @ x["x"]
        return (0.5 * residual**2 + linear).mean() + 0.5 * self.mu_outer * (x["x"] ** 2).sum()

    def _closed_form(self) -> None:
        n, m = self.n_inner, self.n_outer
        eye = torch.eye(self.a.shape[1], dtype=self.dtype, device=self.device)
        self.A_mean = self.a.T @ self.a / n + self.mu_inner * eye
        self.B_mean = self.a.T @ self.b / n
        self.C_mean = self.c.T @ self.c / m
        self.r = self.c.T @ self.y / m
        self.e_mean = self.e.mean(0)
        self.M = torch.linalg.solve(self.A_mean, self.B_mean)
        eye_x = torch.eye(self.b.shape[1], dtype=self.dtype, device=self.device)
        self.P = self.M.T @ self.C_mean @ self.M + self.mu_outer * eye_x
        self.q = self.M.T @ self.r - self.e_mean
        self.minimiser = torch.linalg.solve(self.P, self.q)
        self.minimum = float(self.value(self.minimiser))

    def inner_solution(self, x: Tensor) -> Tensor:
        """z*(x)."""
        return self.M @ x

    def linear_solution(self, x: Tensor) -> Tensor:
        """v*(x) = -Abar^{-1} grad_z F(x, z*(x))."""
        return -torch.linalg.solve(self.A_mean, self.C_mean @ self.inner_solution(x) - self.r)

    def value(self, x: Tensor) -> Tensor:
        """h(x) = F(x, z*(x))."""
        return 0.5 * x @ self.P @ x - self.q @ x + 0.5 * (self.y**2).mean()

    def gradient(self, x: Tensor) -> Tensor:
        """grad h(x)."""
        return self.P @ x - self.q

    def reference_metrics(self, x, z, v) -> dict[str, float]:
        """value h(x), suboptimality h(x) - h*, hypergradient_norm_sq ||grad h(x)||^2,
        inner_error ||z - z*(x)||, linear_error ||v - v*(x)||, distance ||x - x*||."""
        x, z, v = x["x"], z["z"], v["z"]
        offset = x - self.minimiser  # h - h* = 1/2 offset^T P offset, without cancellation
        return {
            "value": float(self.value(x)),
            "suboptimality": float(0.5 * offset @ self.P @ offset),
            "hypergradient_norm_sq": float((self.gradient(x) ** 2).sum()),
            "inner_error": float(torch.linalg.vector_norm(z - self.inner_solution(x))),
            "linear_error": float(torch.linalg.vector_norm(v - self.linear_solution(x))),
            "distance": float(torch.linalg.vector_norm(x - self.minimiser)),
        }
