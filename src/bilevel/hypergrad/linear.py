"""Linear solvers over tuples of tensors, for the implicit methods.

Each takes an operator `matvec(v) -> Av` and a right-hand side b, and returns
(x, info) where info records iterations and the final relative residual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Vec = tuple[Tensor, ...]
MatVec = Callable[[Vec], Vec]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def axpy(alpha, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vec:
    """alpha * x + y."""
    return tuple(alpha * a + b for a, b in zip(x, y))


def norm(a: Sequence[Tensor]) -> Tensor:
    return dot(a, a).sqrt()


def conjugate_gradient(matvec: MatVec, b: Vec, *, iterations: int, tolerance: float):
    """Solve A x = b for symmetric positive definite A (the Hessian at a strict minimum)."""
    x = tuple(torch.zeros_like(v) for v in b)
    r, p = b, b
    rr = dot(r, r)
    stop = tolerance**2 * float(rr)
    done = 0
    while done < iterations and float(rr) > stop:
        ap = matvec(p)
        step = rr / dot(p, ap)
        x = axpy(step, p, x)
        r = axpy(-step, ap, r)
        rr_next = dot(r, r)
        p = axpy(rr_next / rr, p, r)
        rr = rr_next
        done += 1
    return x, _info(done, _relative(norm(r), norm(b)), tolerance)


def neumann(
    matvec: MatVec, b: Vec, *, step: Callable[[Vec], Vec], iterations: int, tolerance: float
):
    """x = sum_i (I - S A)^i S b: a truncated Neumann series for A^{-1} b.

    `step(v)` applies S, a step size (per coordinate if need be) small enough
    that I - S A is a contraction (S = the inner learning rate for gradient descent).
    """
    term = step(b)
    x = term
    done = 0
    while done < iterations and float(norm(term)) > tolerance * float(norm(x)):
        term = axpy(-1.0, step(matvec(term)), term)
        x = axpy(1.0, term, x)
        done += 1
    return x, _info(done, _relative(norm(axpy(-1.0, matvec(x), b)), norm(b)), tolerance)


def fixed_point(transpose_jacobian: MatVec, b: Vec, *, iterations: int, tolerance: float):
    """Solve x = J^T x + b by iteration; converges when J is a contraction."""
    x = b
    change = norm(b)
    done = 0
    while done < iterations and float(change) > tolerance * float(norm(x)):
        new = axpy(1.0, transpose_jacobian(x), b)
        change = norm(axpy(-1.0, x, new))
        x = new
        done += 1
    return x, _info(done, _relative(change, norm(x)), tolerance)


def _info(iterations: int, residual: float, tolerance: float) -> dict:
    # a solve counts as converged a little above its own stopping tolerance, since the
    # residual reported can be measured differently from the one the loop stops on
    return {
        "iterations": iterations,
        "residual": residual,
        "converged": residual <= max(10 * tolerance, 1e-12),
    }


def _relative(residual: Tensor, scale: Tensor) -> float:
    scale = float(scale)
    return float(residual) / scale if scale > 0 else float(residual)
