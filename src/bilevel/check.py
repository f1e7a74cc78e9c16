"""A finite-difference checker for hypergradients of the user's own problem."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .dynamics import Dynamics
from .hypergrad.problem import RandomState, evaluate
from .precision import Precision
from .problem import Problem
from .typing import Init, Objective


@dataclass
class CheckReport:
    """Directional derivatives of f_T: the method's against central differences."""

    method: str
    analytic: Tensor  # <grad f_T, v> for each direction v, by the method
    numeric: Tensor  # (f_T(l + eps v) - f_T(l - eps v)) / (2 eps)
    eps: float

    @property
    def relative_error(self) -> float:
        """||analytic - numeric|| / max(||analytic||, ||numeric||), over all directions."""
        scale = max(float(self.analytic.norm()), float(self.numeric.norm()), 1e-300)
        return float((self.analytic - self.numeric).norm()) / scale

    def passed(self, tolerance: float = 1e-5) -> bool:
        return self.relative_error <= tolerance

    def __str__(self) -> str:
        rows = "\n".join(
            f"  direction {i}: {a:+.10e} (method)  {n:+.10e} (finite differences)"
            for i, (a, n) in enumerate(zip(self.analytic.tolist(), self.numeric.tolist()))
        )
        return (
            f"hypergradient check of method {self.method!r} (eps={self.eps:g}): "
            f"relative error {self.relative_error:.2e}\n{rows}"
        )


def check(
    inner: Objective,
    outer: Objective,
    params: Init,
    hparams: Mapping[str, Tensor],
    dynamics: Dynamics,
    steps: int,
    method: str = "reverse",
    *,
    directions: int | None = None,
    eps: float | None = None,
    seed: int = 0,
    precision: Precision | str | torch.dtype | None = None,
    **options,
) -> CheckReport:
    """Compare `method`'s hypergradient with central finite differences of f_T.

    The other arguments are the problem, as for `bilevel.hypergradient`.

    Args:
        directions: how many random unit directions (default: every coordinate when there are
            at most 16 scalars, else 4).
        eps: the difference step (default 1e-6 in float64, 1e-2 otherwise).
        seed: seeds the directions.

    Returns:
        A CheckReport (`relative_error`, `passed(tolerance)`, a readable `str`).

    With few scalar hyperparameters (<= 16) every coordinate is checked, else
    `directions` random unit directions (default 4). Use float64 if you can:
    float32 limits the agreement to about 1e-3. For implicit methods the
    reference is still f_T, so let the inner problem converge (large `steps`). Every evaluation
    of f_T starts from the random state the method's run started from, so an inner model with
    dropout is compared on the same masks. With a `precision` ("bf16", "fp16") the method runs
    under it and f_T in full precision (a lowered f_T moves in rounding steps that finite
    differences cannot resolve), so the report holds the method's error plus the precision's.
    """
    lam = {k: v.detach() for k, v in hparams.items()}
    random = RandomState.capture([*lam.values()])
    problem = Problem.create(
        inner, outer, params, hparams, dynamics, steps, method, options, precision=precision
    )
    result = problem.hypergradient(hparams)
    basis = _directions(lam, directions, seed)
    if eps is None:
        some = next(iter(lam.values()))
        eps = 1e-6 if some.dtype == torch.float64 else 1e-2
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    inner_problem = problem.inner.full_precision

    def f(shifted):  # the run and then the outer objective draw as in the method's run
        with random.restored():
            z = inner_problem.run(inner_problem.start(params, shifted), shifted, 1, steps)
            with torch.no_grad():
                return float(evaluate("outer", outer, inner_problem.params_of(z), shifted))

    analytic, numeric = [], []
    for v in basis:
        analytic.append(sum(float((result.grads[k] * v[k]).sum()) for k in lam))
        plus = f({k: lam[k] + eps * v[k] for k in lam})
        minus = f({k: lam[k] - eps * v[k] for k in lam})
        numeric.append((plus - minus) / (2 * eps))
    chosen = problem.method if method != "auto" else f"auto ({problem.method})"
    return CheckReport(
        chosen,
        torch.tensor(analytic, dtype=torch.float64),
        torch.tensor(numeric, dtype=torch.float64),
        eps,
    )


def _directions(lam: Mapping[str, Tensor], count: int | None, seed: int):
    size = sum(v.numel() for v in lam.values())
    if count is None and size <= 16:
        flat = torch.eye(size, dtype=torch.float64)
    else:
        if count is None:
            count = 4
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"directions must be an integer >= 1, got {count!r}")
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randn(count, size, generator=generator, dtype=torch.float64)
        flat = flat / flat.norm(dim=1, keepdim=True)
    out = []
    for row in flat:
        offset, direction = 0, {}
        for k, v in lam.items():
            piece = row[offset : offset + v.numel()].reshape(v.shape)
            direction[k] = piece.to(dtype=v.dtype, device=v.device)
            offset += v.numel()
        out.append(direction)
    return out
