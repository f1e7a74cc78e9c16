"""Implicit differentiation of any solver: custom_root, custom_argmin, custom_fixed_point.

Every hypergradient is checked against a closed form or central finite differences, in float64.
"""

from __future__ import annotations

import pytest
import torch

import bilevel

from .problems import Ridge

DTYPE = torch.float64
SOLVERS = ["cg", "gmres", "bicgstab", "normal-cg", "dense"]


@pytest.fixture
def ridge():
    return Ridge()


def ridge_closed_form(ridge):
    """The exact inner minimiser as a solver: a linear solve, no graph."""

    def solver(hparams):
        A = ridge.hessian(hparams["gamma"])
        return {"w": torch.linalg.solve(A, ridge.X.T @ ridge.y / len(ridge.y))}

    return solver


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_argmin_of_a_closed_form_solver_gives_the_exact_hypergradient(ridge, linear_solver):
    solve = bilevel.custom_argmin(ridge.inner, linear_solver=linear_solver)(
        ridge_closed_form(ridge)
    )
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    w = solve({"gamma": gamma})
    ridge.outer(w, None).backward()
    _, exact = ridge.exact()
    torch.testing.assert_close(gamma.grad, exact, rtol=1e-9, atol=1e-12)
    assert solve.info["converged"] and solve.info["residual"] < 1e-9


def test_the_solver_runs_without_a_graph_on_detached_hyperparameters(ridge):
    seen = {}

    def solver(hparams):
        seen["grad_enabled"] = torch.is_grad_enabled()
        seen["requires_grad"] = hparams["gamma"].requires_grad
        return ridge_closed_form(ridge)(hparams)

    bilevel.custom_argmin(ridge.inner)(solver)({"gamma": ridge.gamma})
    assert seen == {"grad_enabled": False, "requires_grad": False}


def lbfgs_solver(objective, start, polish=False):
    """A plain torch.optim.LBFGS loop, as a user would write it. L-BFGS stalls near 1e-9 in
    the gradient; `polish` adds Newton steps to reach rounding level, which finite differences
    of the solution need (an error of 1e-9 would swamp a difference quotient)."""

    def solver(hparams):
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        optimizer = torch.optim.LBFGS(
            params.values(),
            lr=1,
            max_iter=500,
            tolerance_grad=1e-13,
            tolerance_change=0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            loss = objective(params, hparams)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        found = {k: v.detach() for k, v in params.items()}
        return newton_polish(objective, found, hparams) if polish else found

    return solver


def newton_polish(objective, params, hparams, steps=4):
    keys, shapes = list(params), [v.shape for v in params.values()]
    sizes = [v.numel() for v in params.values()]

    def flat_objective(x):
        parts = torch.split(x, sizes)
        return objective({k: p.view(s) for k, p, s in zip(keys, parts, shapes)}, hparams)

    x = torch.cat([v.flatten() for v in params.values()])
    with torch.enable_grad():
        for _ in range(steps):
            x = x - torch.linalg.solve(
                torch.func.hessian(flat_objective)(x), torch.func.grad(flat_objective)(x)
            )
    return {k: p.view(s) for k, p, s in zip(keys, torch.split(x, sizes), shapes)}


def test_an_lbfgs_loop_is_differentiated_implicitly(ridge):
    solve = bilevel.custom_argmin(ridge.inner)(lbfgs_solver(ridge.inner, ridge.params()))
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    ridge.outer(solve({"gamma": gamma}), None).backward()
    _, exact = ridge.exact()
    torch.testing.assert_close(gamma.grad, exact, rtol=1e-7, atol=1e-10)


def central_differences(f, lam: torch.Tensor, eps=1e-5):
    out = torch.zeros_like(lam)
    for i in range(lam.numel()):
        step = torch.zeros_like(lam).flatten()
        step[i] = eps
        step = step.view_as(lam)
        out.view(-1)[i] = (f(lam + step) - f(lam - step)) / (2 * eps)
    return out


@pytest.mark.e2e
def test_a_non_convex_inner_problem_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 4, generator=g, dtype=DTYPE)
    y = torch.randn(30, generator=g, dtype=DTYPE)
    V = torch.randn(4, 3, generator=g, dtype=DTYPE)

    def inner(p, h):  # a two-layer tanh network with per-unit decay: not convex in w
        hidden = torch.tanh(X @ p["W"])
        fit = ((hidden @ p["v"] - y) ** 2).mean()
        return fit + (h["decay"].exp() * p["W"] ** 2).sum() + 0.1 * (p["v"] ** 2).sum()

    def outer(p):
        return ((torch.tanh(X[:10] @ p["W"]) @ p["v"] - y[:10]) ** 2).mean()

    start = {"W": V.clone(), "v": torch.ones(3, dtype=DTYPE) * 0.1}
    solver = lbfgs_solver(inner, start, polish=True)
    solve = bilevel.custom_argmin(inner, linear_solver="gmres")(solver)
    decay = torch.full((4, 3), -3.0, dtype=DTYPE, requires_grad=True)
    (grad,) = torch.autograd.grad(outer(solve({"decay": decay})), decay)
    with torch.no_grad():
        numeric = central_differences(lambda d: outer(solve({"decay": d})), decay.detach())
    assert grad.abs().max() > 1e-4
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def box_problem():
    """min_w |X w - y|^2 / 2n + exp(gamma) |w|^2 / 2 subject to lo <= w <= hi: the solution
    w = clip(w - eta grad L(w), lo, hi) is a fixed point of projected gradient descent."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 6, generator=g, dtype=DTYPE)
    y = X @ torch.tensor([2.0, -2.0, 0.3, -0.2, 1.5, 0.1], dtype=DTYPE)
    lo, hi, eta = -1.0, 1.0, 0.2

    def gradient(w, gamma):
        return X.T @ (X @ w - y) / len(y) + gamma.exp() * w

    def mapping(p, h):
        return {"w": (p["w"] - eta * gradient(p["w"], h["gamma"])).clamp(lo, hi)}

    def solver(h):  # projected gradient descent to convergence
        w = torch.zeros(6, dtype=DTYPE)
        for _ in range(3000):
            w = mapping({"w": w}, h)["w"]
        return {"w": w}

    def exact(gamma):
        """Closed form on the active set found by the solver: the free coordinates solve the
        reduced normal equations with the bound ones fixed (autograd through that solve)."""
        w = solver({"gamma": gamma.detach()})["w"]
        free = (w > lo + 1e-9) & (w < hi - 1e-9)
        A = X.T @ X / len(y) + gamma.exp() * torch.eye(6, dtype=DTYPE)
        bound = torch.where(free, torch.zeros_like(w), w.detach())
        rhs = (X.T @ y / len(y) - A @ bound)[free]
        full = bound.clone()
        full[free] = torch.linalg.solve(A[free][:, free], rhs)
        return full, free

    return mapping, solver, exact


@pytest.mark.parametrize("linear_solver", ["gmres", "fixed-point", "dense"])
def test_a_box_constrained_problem_through_its_projected_gradient_fixed_point(linear_solver):
    mapping, solver, exact = box_problem()
    target = torch.linspace(-1, 1, 6, dtype=DTYPE)
    solve = bilevel.custom_fixed_point(mapping, linear_solver=linear_solver)(solver)
    gamma = torch.tensor(-2.0, dtype=DTYPE, requires_grad=True)  # 0-dim
    (grad,) = torch.autograd.grad(((solve({"gamma": gamma})["w"] - target) ** 2).sum(), gamma)
    gamma_ref = gamma.detach().clone().requires_grad_(True)
    w_exact, free = exact(gamma_ref)
    assert 0 < int(free.sum()) < 6  # some bounds are active: the constraint matters
    (reference,) = torch.autograd.grad(((w_exact - target) ** 2).sum(), gamma_ref)
    torch.testing.assert_close(grad, reference, rtol=1e-8, atol=1e-12)


@pytest.mark.e2e
def test_agrees_with_the_unrolled_methods_at_convergence(ridge):
    steps, lr = 3000, 0.5
    unrolled = bilevel.hypergradient(
        ridge.inner, ridge.outer, ridge.params(), ridge.hparams(), bilevel.sgd(lr=lr), steps
    )

    def gradient_descent(hparams):
        params = ridge.params()
        for _ in range(steps):
            params = {"w": params["w"] - lr * torch.func.grad(ridge.inner)(params, hparams)["w"]}
        return params

    solve = bilevel.custom_argmin(ridge.inner)(gradient_descent)
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    ridge.outer(solve({"gamma": gamma}), None).backward()
    torch.testing.assert_close(gamma.grad, unrolled.grads["gamma"], rtol=1e-8, atol=1e-12)


def test_several_keys_non_leaf_hyperparameters_and_a_batch_of_problems():
    """Dict-valued w and lambda; lambda computed by a network (the gradient goes upstream);
    a leading batch dimension of independent ridge problems, solved as one system."""
    g = torch.Generator().manual_seed(11)
    batch, n, d = 3, 20, 4
    X = torch.randn(batch, n, d, generator=g, dtype=DTYPE)
    y = torch.randn(batch, n, generator=g, dtype=DTYPE)
    theta = torch.randn(2, generator=g, dtype=DTYPE, requires_grad=True)

    def objective(p, h):
        r = torch.einsum("bnd,bd->bn", X, p["w"]) + p["b"] - y
        return (
            0.5 * (r**2).mean(1).sum()
            + 0.5 * (h["decay"].exp() * p["w"] ** 2).sum()
            + (0.5 * h["bias_decay"] * (p["b"] ** 2).sum())
        )

    def solver(h):
        params = {"w": torch.zeros(batch, d, dtype=DTYPE), "b": torch.zeros(batch, 1, dtype=DTYPE)}
        return lbfgs_solver(objective, params, polish=True)(h)

    def hparams_of(theta):  # non-leaf hyperparameters computed from theta
        return {"decay": theta[0] * torch.ones(batch, d, dtype=DTYPE), "bias_decay": theta[1].exp()}

    def loss_of(theta, solve):
        p = solve(hparams_of(theta))
        return (p["w"] ** 2).sum() + (p["b"] ** 3).sum()

    solve = bilevel.custom_argmin(objective)(solver)
    (grad,) = torch.autograd.grad(loss_of(theta, solve), theta)
    with torch.no_grad():
        numeric = central_differences(lambda t: loss_of(t, solve), theta.detach())
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)


def test_the_jacobian_by_torch_autograd_functional(ridge):
    solve = bilevel.custom_argmin(ridge.inner)(ridge_closed_form(ridge))
    gamma = ridge.gamma.detach()
    jacobian = torch.autograd.functional.jacobian(lambda g: solve({"gamma": g})["w"], gamma)
    A = ridge.hessian(gamma)
    w = torch.linalg.solve(A, ridge.X.T @ ridge.y / len(ridge.y))
    exact = -torch.linalg.solve(A, torch.diag(gamma.exp() * w))  # dw/dgamma = -A^{-1} diag(e^g w)
    torch.testing.assert_close(jacobian, exact, rtol=1e-9, atol=1e-12)


def test_an_unconverged_linear_solve_warns_and_says_so_in_info(ridge):
    solve = bilevel.custom_argmin(ridge.inner, iterations=1)(ridge_closed_form(ridge))
    with pytest.warns(bilevel.SolverWarning, match="stopped after 1 iterations"):
        ridge.outer(solve({"gamma": ridge.gamma.detach().requires_grad_(True)}), None).backward()
    assert solve.info["iterations"] == 1 and not solve.info["converged"]


def test_bad_input_is_named(ridge):
    with pytest.raises(ValueError, match="unknown linear solver 'lu'; choose one of"):
        bilevel.custom_argmin(ridge.inner, linear_solver="lu")
    with pytest.raises(TypeError, match="optimality must be a callable"):
        bilevel.custom_root("gradient")
    with pytest.raises(TypeError, match="the solver's result must be a dict"):
        bilevel.custom_argmin(ridge.inner)(lambda h: torch.zeros(6))({"gamma": ridge.gamma})

    def wrong_keys(p, h):
        return {"v": p["w"]}

    solve = bilevel.custom_root(wrong_keys)(ridge_closed_form(ridge))
    with pytest.raises(ValueError, match=r"solver's keys \['w'\], got \['v'\]"):
        ridge.outer(solve({"gamma": ridge.gamma}), None).backward()

    def wrong_shape(p, h):
        return {"w": p["w"].sum()}

    solve = bilevel.custom_root(wrong_shape)(ridge_closed_form(ridge))
    with pytest.raises(ValueError, match=r"returned shape \(\) for a parameter of shape \(6,\)"):
        ridge.outer(solve({"gamma": ridge.gamma}), None).backward()


def test_torch_func_transforms_are_refused_with_a_message(ridge):
    solve = bilevel.custom_argmin(ridge.inner)(ridge_closed_form(ridge))
    with pytest.raises(RuntimeError, match="functorch|torch.func|setup_context"):
        torch.func.grad(lambda g: ridge.outer(solve({"gamma": g}), None))(ridge.gamma.detach())
