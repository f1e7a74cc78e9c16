"""Implicit differentiation of a solver you already have: L-BFGS and projected gradient.

What it shows
    Two solvers that bilevel did not write, made differentiable by the implicit function
    theorem, and their hypergradients checked against central finite differences in float64:

    - `bilevel.custom_argmin` around a `torch.optim.LBFGS` loop that fits an L2-regularised
      logistic regression, one regularisation strength exp(log_l2[j]) per feature. The
      decorator differentiates the optimality condition (the gradient of the objective is 0)
      with conjugate gradient on the Hessian; the solver runs without any graph.
    - `bilevel.custom_fixed_point` around a projected-gradient solver of a box-constrained
      least-squares problem (weights in [0, 1], some of them at a bound): the solution is a
      fixed point of w -> clip(w - step * grad, 0, 1), whose derivative is zero along the
      active bounds, so the hypergradient knows which constraints bind.

    For each it prints the hypergradient of a validation loss with respect to the
    hyperparameters, the finite differences of the whole pipeline (rerunning the solver at
    lambda +- eps along each coordinate) and their relative error.

Cost (measured on 2 CPU cores shared with other jobs, load 3 to 6; PyTorch 2.13)
    `time python examples/06_implicit_custom_solvers.py`: 4-11 s (8 features); with `--quick` (4
    features): 5-10 s. Starting Python and torch is 2-5 s of that.

To adapt it
    Wrap your solver: `@bilevel.custom_argmin(objective)` when it minimises
    objective(params, hparams), `@bilevel.custom_fixed_point(mapping)` when it iterates
    params = mapping(params, hparams), `@bilevel.custom_root(F)` for any other optimality
    condition F(params, hparams) = 0. The solver takes the hyperparameters (a dict) and
    returns a dict of tensors; it must actually converge, since the derivative is that of
    the exact solution. Keep the finite-difference check below while you develop.
"""

import argparse
import time

import torch
from torch import nn

import bilevel


def central_differences(f, lam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(f(lam + eps e_j) - f(lam - eps e_j)) / (2 eps) for every coordinate j."""
    result = torch.empty_like(lam)
    for j in range(lam.numel()):
        step = torch.zeros_like(lam)
        step.view(-1)[j] = eps
        result.view(-1)[j] = (f(lam + step) - f(lam - step)) / (2 * eps)
    return result


def report(name: str, analytic: torch.Tensor, numeric: torch.Tensor) -> None:
    error = float((analytic - numeric).norm() / numeric.norm())
    print(f"{name}")
    print("  hypergradient:      " + " ".join(f"{v:+.6e}" for v in analytic.tolist()))
    print("  finite differences: " + " ".join(f"{v:+.6e}" for v in numeric.tolist()))
    print(f"  {name}: relative error {error:.2e}")


def logistic_regression_with_lbfgs(generator: torch.Generator, features: int) -> None:
    x = torch.randn(200, features, generator=generator)
    teacher = torch.randn(features, generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(200, generator=generator) > 0).double()
    x_train, y_train, x_val, y_val = x[:100], y[:100], x[100:], y[100:]
    bce = nn.functional.binary_cross_entropy_with_logits

    def objective(p, h):  # the training loss with one L2 strength per feature
        return bce(x_train @ p["w"], y_train) + 0.5 * (h["log_l2"].exp() * p["w"] ** 2).sum()

    @bilevel.custom_argmin(objective)
    def fit(h):  # any solver: here torch.optim.LBFGS, run to a tight tolerance
        w = torch.zeros(features, requires_grad=True)
        # no line search: one judges steps by the loss, whose rounding stops it at gradients
        # near 1e-10; unit steps converge on this smooth convex problem, to 1e-14
        lbfgs = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-14, tolerance_change=0)

        def closure():
            lbfgs.zero_grad()
            loss = objective({"w": w}, h)
            loss.backward()
            return loss

        with torch.enable_grad():  # the decorator calls the solver under no_grad
            lbfgs.step(closure)
        return {"w": w.detach()}

    def validation_loss(log_l2: torch.Tensor) -> torch.Tensor:
        return bce(x_val @ fit({"log_l2": log_l2})["w"], y_val)

    log_l2 = torch.full((features,), -2.0, requires_grad=True)
    validation_loss(log_l2).backward()
    with torch.no_grad():
        numeric = central_differences(lambda v: float(validation_loss(v)), log_l2.detach())
    report("custom_argmin around torch.optim.LBFGS", log_l2.grad, numeric)


def box_least_squares_with_projected_gradient(generator: torch.Generator, features: int):
    teacher = torch.linspace(-0.5, 1.5, features)  # the ends lie outside [0, 1]: bounds bind
    x = torch.randn(200, features, generator=generator)
    y = x @ teacher + 0.1 * torch.randn(200, generator=generator)
    x_train, y_train, x_val, y_val = x[:100], y[:100], x[100:], y[100:]
    step = 1.0 / float(torch.linalg.matrix_norm(x_train, ord=2) ** 2 / 100 + 1.0)  # 1 / L

    def projected_step(p, h):  # clip(w - step * gradient, 0, 1): its fixed point is the answer
        residual = x_train @ p["w"] - y_train
        gradient = x_train.T @ residual / len(y_train) + h["log_l2"].exp() * p["w"]
        return {"w": (p["w"] - step * gradient).clamp(0.0, 1.0)}

    @bilevel.custom_fixed_point(projected_step)
    def fit(h):
        w = {"w": torch.full((features,), 0.5)}
        for _ in range(10_000):
            new = projected_step(w, h)
            if float((new["w"] - w["w"]).abs().max()) < 1e-15:
                break
            w = new
        return new

    def validation_loss(log_l2: torch.Tensor) -> torch.Tensor:
        return ((x_val @ fit({"log_l2": log_l2})["w"] - y_val) ** 2).mean()

    log_l2 = torch.full((features,), -3.0, requires_grad=True)
    validation_loss(log_l2).backward()
    w = fit({"log_l2": log_l2.detach()})["w"]
    active = int(((w == 0) | (w == 1)).sum())
    with torch.no_grad():
        numeric = central_differences(lambda v: float(validation_loss(v)), log_l2.detach())
    print(f"box-constrained solution: {active} of {features} weights at a bound")
    report("custom_fixed_point around projected gradient", log_l2.grad, numeric)


def main(quick: bool) -> None:
    began = time.perf_counter()
    torch.set_num_threads(1)  # tensors this small: more threads only add synchronisation
    torch.set_default_dtype(torch.float64)  # the finite differences need it
    features = 4 if quick else 8
    logistic_regression_with_lbfgs(torch.Generator().manual_seed(0), features)
    box_least_squares_with_projected_gradient(torch.Generator().manual_seed(1), features)
    print(f"wall time: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer features (tests)")
    main(parser.parse_args().quick)
