"""Linear solvers over tuples of tensors, for the implicit methods.

Each takes an operator `matvec(v) -> Av` and a right-hand side b, and returns
(x, info) where info records iterations and the final relative residual.

The solvers in `SOLVERS` share one signature,

    solver(matvec, b, *, iterations, tolerance, rmatvec=None, **solver_specific) -> (x, info)

with `rmatvec(v) -> A^T v` used only by those that need it ("normal-cg"). Their info holds
`iterations`, `residual`, the TRUE relative residual ||b - A x|| / ||b|| of the x returned
(recurrences drift from it in finite precision, so it is measured with one more product),
and `converged`. They never return NaN: a breakdown (a zero denominator) ends the solve with
the best x so far, reported as not converged unless it solves the system.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from .. import validate

Vec = tuple[Tensor, ...]
MatVec = Callable[[Vec], Vec]
# one cycle of an iterative method: (residual r, budget, threshold) -> (correction e for
# A e = r, iterations used, how it ended: its recurrence residual MET the threshold, it SPENT
# its budget or restart length, or it is STUCK at a breakdown no further cycle can get past)
Cycle = Callable[[Vec, int, float], tuple[Vec, int, str]]
MET, SPENT, STUCK = "met", "spent", "stuck"


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def axpy(alpha, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vec:
    """alpha * x + y."""
    return tuple(alpha * a + b for a, b in zip(x, y))


def norm(a: Sequence[Tensor]) -> Tensor:
    return dot(a, a).sqrt()


def propagating_non_finite(solver: Callable) -> Callable:
    """A NaN or infinite right-hand side gives a NaN solution (as autograd would pass it on),
    not the zeros a loop that never starts would return: the NaN check downstream names it."""

    @functools.wraps(solver)
    def solve(matvec, b, *args, **kwargs):
        if not all(bool(torch.isfinite(v).all()) for v in b):
            return tuple(torch.full_like(v, math.nan) for v in b), {
                "iterations": 0,
                "residual": math.nan,
                "converged": False,
            }
        return solver(matvec, b, *args, **kwargs)

    return solve


@propagating_non_finite
def conjugate_gradient(
    matvec: MatVec, b: Vec, *, iterations: int, tolerance: float, rmatvec: MatVec | None = None
):
    """Solve A x = b for symmetric positive definite A (the Hessian at a strict minimum).

    Args:
        matvec: v -> A v.
        b: the right-hand side, a tuple of tensors.
        iterations: the most CG steps (one product each), restarts included.
        tolerance: stop once ||b - A x|| <= tolerance ||b||.
        rmatvec: unused (A is symmetric); accepted for the uniform signature.

    Returns:
        (x, info). The recurrence residual is checked against the true one (one more product
        per run); where they disagree (rounding) CG restarts from the true residual within the
        budget.
    """
    return _iterate(partial(_cg_cycle, matvec), matvec, b, iterations, tolerance)


@propagating_non_finite
def gmres(
    matvec: MatVec,
    b: Vec,
    *,
    iterations: int,
    tolerance: float,
    rmatvec: MatVec | None = None,
    restart: int | None = 20,
):
    """Solve A x = b for any nonsingular A by restarted GMRES.

    Each cycle builds an orthonormal Krylov basis by Arnoldi with modified Gram-Schmidt and
    minimises ||r - A e|| over it (Givens rotations give the residual at every step).

    Args:
        matvec: v -> A v.
        b: the right-hand side, a tuple of tensors.
        iterations: the most Arnoldi steps (one product each), over all cycles.
        tolerance: stop once ||b - A x|| <= tolerance ||b||.
        rmatvec: unused; accepted for the uniform signature.
        restart: basis vectors kept per cycle (memory: restart + 1 copies of b); None keeps
            them all (full GMRES: exact within dim(b) steps in exact arithmetic).

    Returns:
        (x, info); each restart, and the end, costs one product for the true residual.
    """
    size = iterations if restart is None else validate.positive_int("restart", restart)
    return _iterate(partial(_gmres_cycle, matvec, size), matvec, b, iterations, tolerance)


@propagating_non_finite
def bicgstab(
    matvec: MatVec, b: Vec, *, iterations: int, tolerance: float, rmatvec: MatVec | None = None
):
    """Solve A x = b for any nonsingular A by BiCGSTAB (van der Vorst), in O(d) memory.

    Args:
        matvec: v -> A v.
        b: the right-hand side, a tuple of tensors.
        iterations: the most BiCGSTAB steps (two products each).
        tolerance: stop once ||b - A x|| <= tolerance ||b||.
        rmatvec: unused; accepted for the uniform signature.

    Returns:
        (x, info) with the true residual (one more product). A breakdown (the shadow residual
        orthogonal to A p or to r, or A s orthogonal to s) stops the solve.
    """
    return _iterate(partial(_bicgstab_cycle, matvec), matvec, b, iterations, tolerance)


@propagating_non_finite
def normal_cg(
    matvec: MatVec, b: Vec, *, iterations: int, tolerance: float, rmatvec: MatVec | None = None
):
    """Solve A x = b for a general (non-symmetric, possibly singular) A by CG on A^T A x = A^T b.

    This is CGNR (CGLS), not CGNE (A A^T y = b, x = A^T y): CGNR minimises ||b - A x||, the
    residual reported and stopped on, over its Krylov space, so that residual never grows; and
    A^T A x = A^T b has a solution for every b, so where b is (slightly) outside the range of a
    singular A (an inner problem solved only approximately) CGNR converges to the least-squares
    solution while CGNE's system has none and its iterates grow. Both start at x = 0 in the
    range of A^T, so both give the minimum-norm solution of a consistent singular system; both
    cost two products a step and square A's condition number.

    Args:
        matvec: v -> A v.
        b: the right-hand side, a tuple of tensors.
        iterations: the most steps (one product by A and one by A^T each).
        tolerance: stop once ||b - A x|| <= tolerance ||b||.
        rmatvec: v -> A^T v, required.

    Returns:
        (x, info) with the true residual (one more product). Where A^T r vanishes to rounding
        before r meets the tolerance, b is not in A's range: x is the least-squares solution,
        reported as not converged.
    """
    if rmatvec is None:
        raise ValueError(
            "normal-cg needs rmatvec=..., the product v -> A^T v (it solves A^T A x = A^T b)"
        )
    return _iterate(partial(_normal_cycle, matvec, rmatvec), matvec, b, iterations, tolerance)


@propagating_non_finite
def dense(
    matvec: MatVec,
    b: Vec,
    *,
    iterations: int,
    tolerance: float,
    rmatvec: MatVec | None = None,
    max_size: int = 2000,
    least_squares: bool = False,
):
    """Solve A x = b directly, for small problems: A is built column by column from `matvec`.

    Building A costs d = (number of entries of b) products and d^2 numbers of memory.
    The solve is LU (torch.linalg.solve_ex): exact and cheapest for a nonsingular A. Where LU
    fails (A singular to rounding: its result is not finite or misses the tolerance), or with
    `least_squares=True`, it is torch.linalg.lstsq with the SVD driver (gelsd, on the CPU: the
    GPU's only driver assumes full rank), which gives the minimum-norm least-squares solution
    of any A. LU may solve a consistent singular system too, with any null-space component:
    ask for `least_squares=True` where the minimum-norm solution matters.

    Args:
        matvec: v -> A v.
        b: the right-hand side, a tuple of tensors.
        iterations: unused (the cost is d products whatever it is); uniform signature.
        tolerance: `converged` means ||b - A x|| <= tolerance ||b|| (up to the usual slack).
        rmatvec: unused; accepted for the uniform signature.
        max_size: the largest d accepted; above it a ValueError is raised.
        least_squares: skip LU and solve by least squares (for a singular A).

    Returns:
        (x, info) with info["iterations"] = d, the products made.
    """
    b = _checked(b, iterations, tolerance)
    max_size = validate.positive_int("max_size", max_size)
    validate.boolean("least_squares", least_squares)
    size = sum(t.numel() for t in b)
    if size > max_size:
        raise ValueError(
            f"dense solver: the system has {size} unknowns, above max_size={max_size} (it "
            f"would take {size} products and a {size} x {size} matrix); raise max_size or use "
            "an iterative solver ('cg', 'gmres', 'bicgstab', 'normal-cg')"
        )
    rhs = _flatten(b)
    if not bool(rhs.any()):
        return _zeros(b), _info(0, 0.0, tolerance, b)
    matrix = _matrix(matvec, b)
    x = _dense_solve(matrix, rhs, least_squares, tolerance * float(norm(b)))
    residual = _relative(torch.linalg.vector_norm(rhs - matrix @ x), norm(b))
    return _unflatten(x, b), _info(size, residual, tolerance, b)


SOLVERS: dict[str, Callable] = {
    "cg": conjugate_gradient,
    "gmres": gmres,
    "bicgstab": bicgstab,
    "normal-cg": normal_cg,
    "dense": dense,
}


def solver_named(name: str) -> Callable:
    """The solver registered as `name` in SOLVERS, or a ValueError listing the names."""
    if name not in SOLVERS:
        raise ValueError(f"unknown linear solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


@propagating_non_finite
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
    return x, _info(done, _relative(norm(axpy(-1.0, matvec(x), b)), norm(b)), tolerance, b)


@propagating_non_finite
def fixed_point(transpose_jacobian: MatVec, b: Vec, *, iterations: int, tolerance: float):
    """Solve x = J^T x + b by iteration; converges when J is a contraction.

    The residual of an iterate, b - (I - J^T) x_k, is the next step's change x_{k+1} - x_k:
    the loop stops on it relative to ||b|| and reports it (for the iterate before the one
    returned, which a contraction only improves), the true residual and not the step size
    relative to ||x||, which is (1 - rho) times smaller for a slow contraction."""
    x, scale = b, float(norm(b))
    change, done = scale, 0
    while done < iterations and float(change) > tolerance * scale:
        new = axpy(1.0, transpose_jacobian(x), b)
        change = norm(axpy(-1.0, x, new))
        x = new
        done += 1
    return x, _info(done, _relative(change, norm(b)), tolerance, b)


def _iterate(cycle: Cycle, matvec: MatVec, b, iterations, tolerance):
    """Run cycles of a method from the TRUE residual b - A x until it meets the tolerance.

    Each cycle solves A e = r from e = 0 by its own recurrences; x += e, then r = b - A x is
    measured (one product), so the residual reported is always the true one. Where the
    recurrence met the tolerance and the true residual did not (rounding), the next cycle
    restarts from the true one. Cycles stop at a breakdown, or when one gains nothing (or,
    having met its tolerance, not even a factor 2: the floor rounding allows is reached).
    """
    b = _checked(b, iterations, tolerance)
    scale = float(norm(b))
    x, r, residual, done = _zeros(b), b, scale, 0
    while residual > tolerance * scale and done < iterations:
        correction, used, outcome = cycle(r, iterations - done, tolerance * scale)
        x, done, before = axpy(1.0, correction, x), done + used, residual
        r = axpy(-1.0, matvec(x), b)
        residual = float(norm(r))
        if outcome == STUCK or used == 0 or residual >= before:
            break  # a breakdown, or a cycle that gained nothing: the next would repeat it
        if outcome == MET and residual > before / 2:
            break  # the recurrence met the tolerance, the true residual hardly fell: rounding
    return x, _info(done, _relative(residual, scale), tolerance, b)


def _cg_cycle(matvec: MatVec, r: Vec, budget: int, threshold: float):
    x, p, rr = _zeros(r), r, dot(r, r)
    done = 0
    while done < budget and float(rr) > threshold**2:
        ap = matvec(p)
        curvature = dot(p, ap)
        if _negligible(curvature, p, ap):
            return x, done, STUCK  # p^T A p = 0: A is not positive definite along p
        step = rr / curvature
        x, r = axpy(step, p, x), axpy(-step, ap, r)
        rr_next = dot(r, r)
        p = axpy(rr_next / rr, p, r)
        rr = rr_next
        done += 1
    return x, done, MET if float(rr) <= threshold**2 else SPENT


def _gmres_cycle(matvec: MatVec, restart: int, r: Vec, budget: int, threshold: float):
    """At most `restart` Arnoldi steps from r; the correction minimising ||r - A e|| over them."""
    size, beta = min(restart, budget), float(norm(r))
    basis = [_scale(1.0 / beta, r)]
    columns, rotations, g = [], [], [beta]  # the rotated Hessenberg matrix and beta e_1
    invariant = False
    while len(columns) < size and abs(g[-1]) > threshold and not invariant:
        w, column, invariant = _arnoldi_step(matvec, basis)
        if not invariant:
            basis.append(_scale(1.0 / column[-1], w))
        columns.append(_givens(column, rotations, g))
    y, residual = _triangular_least_squares(columns, g)
    # a lucky breakdown (invariant Krylov space) holds the exact solution if there is one in
    # it; where there is none (singular A), a new cycle would build the same space again
    outcome = MET if residual <= threshold else STUCK if invariant else SPENT
    return _combine(y, basis), len(columns), outcome


def _arnoldi_step(matvec: MatVec, basis: list[Vec]):
    """A v_j orthogonalised against the basis (modified Gram-Schmidt: one vector at a time,
    each projection taken from the updated w, which keeps the basis orthogonal far better than
    projecting the original w). Returns (w, [h_1j .. h_jj, h_j+1,j], whether w vanished)."""
    w = matvec(basis[-1])
    size = norm(w)
    column = []
    for v in basis:
        h = dot(w, v)
        w = axpy(-h, v, w)
        column.append(h)
    column.append(norm(w))
    column = [float(h) for h in torch.stack(column).tolist()]
    return w, column, column[-1] <= _eps(w) * float(size)


def _givens(column: list[float], rotations: list, g: list[float]) -> list[float]:
    """Apply the earlier rotations to a new Hessenberg column, then the one that zeroes its
    last entry, to the column and to g; returns the column's part of the triangular R."""
    for i, (c, s) in enumerate(rotations):
        upper, lower = column[i], column[i + 1]
        column[i], column[i + 1] = c * upper + s * lower, c * lower - s * upper
    diagonal = math.hypot(column[-2], column[-1])
    c, s = (column[-2] / diagonal, column[-1] / diagonal) if diagonal > 0 else (1.0, 0.0)
    rotations.append((c, s))
    g.append(-s * g[-1])
    g[-2] *= c
    return column[:-2] + [diagonal]


def _triangular_least_squares(columns: list[list[float]], g: list[float]):
    """y minimising ||g - [R; 0] y|| and that minimum. Least squares (SVD), not back
    substitution, since R has a zero diagonal where A is singular on the Krylov space."""
    size = len(columns)
    triangle = torch.zeros(size, size, dtype=torch.float64)
    for j, column in enumerate(columns):
        triangle[: j + 1, j] = torch.tensor(column, dtype=torch.float64)
    rhs = torch.tensor(g[:size], dtype=torch.float64)
    y = torch.linalg.lstsq(triangle, rhs[:, None], driver="gelsd").solution[:, 0]
    return y.tolist(), math.hypot(float(torch.linalg.vector_norm(rhs - triangle @ y)), g[size])


def _bicgstab_cycle(matvec: MatVec, r: Vec, budget: int, threshold: float):
    shadow, p, x = r, r, _zeros(r)
    rho = dot(shadow, r)
    done = 0
    while done < budget:
        v = matvec(p)
        shadow_v = dot(shadow, v)
        if _negligible(shadow_v, shadow, v):
            return x, done, STUCK
        alpha = rho / shadow_v
        x, s = axpy(alpha, p, x), axpy(-alpha, v, r)
        done += 1
        if float(norm(s)) <= threshold:
            return x, done, MET
        t = matvec(s)
        ts = dot(t, s)
        if _negligible(ts, t, s):
            return x, done, STUCK  # omega = 0: the step along s stalls and beta divides by it
        omega = ts / dot(t, t)
        x, r = axpy(omega, s, x), axpy(-omega, t, s)
        if float(norm(r)) <= threshold:
            return x, done, MET
        rho_next = dot(shadow, r)
        if _negligible(rho_next, shadow, r):
            return x, done, STUCK
        p = axpy((rho_next / rho) * (alpha / omega), axpy(-omega, v, p), r)
        rho = rho_next
    return x, done, SPENT


def _normal_cycle(matvec: MatVec, rmatvec: MatVec, r: Vec, budget: int, threshold: float):
    """CGLS: CG on A^T A e = A^T r, with r = b - A x updated directly (not A^T r)."""
    x, s = _zeros(r), rmatvec(r)
    p, gamma = s, dot(s, s)
    floor = (_eps(r) * float(gamma.sqrt())) ** 2  # A^T r at rounding: least squares solved
    done = 0
    while done < budget and float(norm(r)) > threshold:
        if float(gamma) <= floor:
            return x, done, STUCK  # b is not in the range of A: x is a least-squares solution
        q = matvec(p)
        alpha = gamma / dot(q, q)
        x, r = axpy(alpha, p, x), axpy(-alpha, q, r)
        s = rmatvec(r)
        gamma_next = dot(s, s)
        p = axpy(gamma_next / gamma, p, s)
        gamma = gamma_next
        done += 1
    return x, done, MET if float(norm(r)) <= threshold else SPENT


def _matrix(matvec: MatVec, like: Vec) -> Tensor:
    """A as a dense d x d matrix, one product per column."""
    size = sum(t.numel() for t in like)
    basis = torch.eye(size, dtype=like[0].dtype, device=like[0].device)
    return torch.stack([_flatten(matvec(_unflatten(e, like))) for e in basis], dim=1)


def _dense_solve(matrix: Tensor, rhs: Tensor, least_squares: bool, threshold: float) -> Tensor:
    """LU where it solves the system to the threshold, else the better of it and lstsq."""

    def residual(x):
        return float(torch.linalg.vector_norm(rhs - matrix @ x))

    candidates = []
    if not least_squares:
        x, singular = torch.linalg.solve_ex(matrix, rhs)
        if int(singular) == 0 and bool(torch.isfinite(x).all()):
            if residual(x) <= threshold:
                return x
            candidates.append(x)
    solution = torch.linalg.lstsq(matrix.cpu(), rhs.cpu()[:, None], driver="gelsd").solution
    candidates.append(solution[:, 0].to(rhs.device))
    return min(candidates, key=residual)


def _checked(b, iterations, tolerance) -> Vec:
    if not isinstance(b, Sequence) or not b or not all(isinstance(t, Tensor) for t in b):
        raise TypeError(f"b must be a non-empty tuple of tensors, got {type(b).__name__}")
    validate.positive_int("iterations", iterations)
    validate.non_negative("tolerance", tolerance)
    return tuple(b)


def _negligible(value: Tensor, u: Vec, v: Vec) -> bool:
    """|value| (a dot product of u and v) is zero to rounding: a denominator to refuse."""
    return abs(float(value)) <= _eps(u) * float(norm(u)) * float(norm(v))


def _eps(v: Vec) -> float:
    return torch.finfo(v[0].dtype).eps


def _zeros(like: Vec) -> Vec:
    return tuple(torch.zeros_like(t) for t in like)


def _scale(alpha, v: Vec) -> Vec:
    return tuple(alpha * t for t in v)


def _combine(coefficients: list[float], vectors: list[Vec]) -> Vec:
    total = _zeros(vectors[0])
    for c, v in zip(coefficients, vectors):
        total = axpy(c, v, total)
    return total


def _flatten(v: Vec) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _unflatten(flat: Tensor, like: Vec) -> Vec:
    pieces = torch.split(flat, [t.numel() for t in like])
    return tuple(piece.reshape(t.shape) for piece, t in zip(pieces, like))


def _info(iterations: int, residual: float, tolerance: float, like: Vec) -> dict:
    """A solve counts as converged a little above its own stopping tolerance, since the
    residual reported can be measured differently from the one the loop stops on, and at the
    floor its dtype's rounding allows (100 eps: 1.2e-5 in float32, where the default 1e-10
    cannot be reached and a warning on every accurate solve would teach users to ignore it)."""
    floor = 100 * torch.finfo(like[0].dtype).eps if like else 0.0
    return {
        "iterations": iterations,
        "residual": residual,
        "converged": residual <= max(10 * tolerance, 1e-12, floor),
    }


def _relative(residual: Tensor, scale: Tensor) -> float:
    scale = float(scale)
    return float(residual) / scale if scale > 0 else float(residual)
