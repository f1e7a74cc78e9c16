"""The first-order stochastic solvers (F2SA, BOME, PZOBO) and the engine's references (unrolled,
implicit) on the quadratic whose z*(x), h and grad h are known in closed form: each direction
against its closed form, convergence to the minimiser, exact resumption, samples counted as
documented, one-line errors. All in float64, all seeded."""

import pytest
import torch

from bilevel import stochastic


@pytest.fixture(scope="module")
def problem():
    return stochastic.QuadraticProblem(
        n_inner=64, n_outer=32, dim_inner=5, dim_outer=3, mu_inner=0.2, smooth_inner=1.0
    )


def vector(seed, size):
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


FULL = {"inner_batch": 64, "outer_batch": 32}


# -- the new primitives ---------------------------------------------------------------------


def test_inner_gradients_are_the_closed_form_in_x_and_z(problem):
    x, z = vector(1, 3), vector(2, 5)
    batch = torch.tensor([3, 17, 40])
    a, b = problem.a[batch], problem.b[batch]
    A = a.T @ a / 3 + problem.mu_inner * torch.eye(5, dtype=torch.float64)
    B = a.T @ b / 3
    gradient_x, gradient_z = problem.inner_gradients(x, z, batch)
    torch.testing.assert_close(gradient_x, -B.T @ z, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gradient_z, A @ z - B @ x, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gradient_z, problem.inner_gradient(x, z, batch), rtol=0, atol=0)


def test_gaussian_draws_are_seeded_and_resumable():
    sampler = stochastic.Sampler(5)
    state = sampler.state_dict()
    first = sampler.gaussian(4, 3, torch.float64)
    assert first.shape == (4, 3) and first.dtype == torch.float64
    sampler.load_state_dict(state)
    assert torch.equal(sampler.gaussian(4, 3, torch.float64), first)
    assert not torch.equal(sampler.gaussian(4, 3, torch.float64), first)
