"""A bilevel problem, validated once and then passed as one value.

    problem = bilevel.Problem.create(inner, outer, params, hparams, dynamics, steps, method)
    result = problem.hypergradient(hparams)      # any number of times, no re-validation

`hypergradient`, `solve`, `check` and the outer loops all build one `Problem` and work on it,
so a mistake is reported once, where the problem is described, and never again per step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import validate
from .dynamics import Dynamics
from .errors import HypergradientError, HypergradientWarning
from .hypergrad import METHODS
from .hypergrad.auto import choose
from .hypergrad.problem import InnerProblem, RandomState, evaluate, leaf_dict, with_step
from .precision import Precision, check_hypergradient
from .precision import resolve as resolve_precision
from .typing import Hparams, Init, Method, Objective, Params, Solution


@dataclass
class Result:
    """What `hypergradient` returns.

    Attributes:
        grads: d f_T / d lambda for each hyperparameter (implicit methods: their estimate of
            d f / d lambda at the inner solution).
        params: w_T.
        value: f_T(lambda) = E(w_T, lambda).
        method: the method's name; seconds: its wall time.
        info: what the method reports (solver iterations and residuals, notes).
    """

    grads: dict[str, Tensor]
    params: dict[str, Tensor]
    value: float
    method: str
    seconds: float
    info: dict = field(default_factory=dict)
    hparams: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def backward(self) -> None:
        """Continue back-propagation from the hyperparameters into whatever computed them.

        Leaf hyperparameters accumulate the hypergradient in `.grad`, as after
        `loss.backward()`; non-leaf ones (features of a network) pass it upstream.
        """
        keys = list(self.hparams)
        torch.autograd.backward([self.hparams[k] for k in keys], [self.grads[k] for k in keys])


@dataclass(frozen=True)
class Problem:
    """A validated bilevel problem: build it with `Problem.create`.

    Attributes:
        inner: the inner objective and dynamics as the methods see them (flat state, steps).
        outer: E(w, lambda), or None for a plain differentiable solve (`bilevel.solve`).
        init: w_0, or Phi_0(hparams) for a learned initialisation.
        steps: T; method: its name; options: its keyword options.
        auto: what method="auto" measured and chose (reported in Result.info["auto"]), or None.
    """

    inner: InnerProblem
    outer: Objective | None
    init: Init
    steps: int
    method: str
    options: Mapping[str, object]
    auto: Mapping[str, object] | None = None

    @classmethod
    def create(
        cls,
        inner: Objective,
        outer: Objective | None,
        params: Init,
        hparams: Hparams,
        dynamics: Dynamics,
        steps: int,
        method: str = "reverse",
        options: Mapping[str, object] | None = None,
        *,
        require_grad: bool = True,
        precision: Precision | str | torch.dtype | None = None,
    ) -> Problem:
        """Check every argument once; raise an error that names the one at fault.

        Args:
            inner: L(params, hparams[, step]) -> scalar, the objective the dynamics minimise.
            outer: E(params, hparams) -> scalar, or None (no outer objective: `solve`).
            params: w_0 (dict of tensors), or a function hparams -> w_0.
            hparams: the hyperparameters (their values now; only keys, dtypes, devices and
                shapes are checked, so later calls may pass other values).
            dynamics: the inner optimiser, e.g. `bilevel.sgd(lr=0.1)`.
            steps: T >= 1.
            method: a name of `bilevel.METHODS`; options: its keyword options. "auto"
                (option memory_budget) is resolved here into the fastest exact method that fits.
            require_grad: every hyperparameter must require grad (False for `solve`).
            precision: None (full precision), "bf16", "fp16" or a bilevel.Precision: the inner
                objective under torch.autocast, the state in float32 (bilevel.precision).
        Returns:
            The Problem.
        """
        options = dict(options or {})
        validate.objective("inner", inner)
        if outer is not None:
            validate.objective("outer", outer)
        if require_grad:
            validate.hyperparameters(hparams)
        else:  # a plain differentiable solve may have no hyperparameters at all
            validate.tensor_dict("hparams", hparams, allow_empty=True)
        if not isinstance(dynamics, Dynamics):
            raise TypeError(
                f"dynamics must be a bilevel.Dynamics such as bilevel.sgd(lr=0.1), got "
                f"{type(dynamics).__name__}"
            )
        steps = validate.steps(steps)
        _check_autograd_available()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        validate.options(method, METHODS[method], options)
        start = _initial_params(params, hparams)
        validate.same_kind(start, hparams)
        precision = resolve_precision(precision, start, hparams)
        problem = InnerProblem(with_step(inner), dynamics, tuple(start), precision)
        decision = None
        if method == "auto":  # resolved once, here: a Problem holds a concrete method
            decision = choose(problem, params, hparams, steps, **options)
            method, options = decision["method"], dict(decision["options"])
        return cls(problem, outer, params, steps, method, options, decision)

    @property
    def run(self) -> Method:
        return METHODS[self.method]

    def solution(self, hparams: Hparams) -> Solution:
        """Run the method: the inner steps and what its pull-back needs."""
        return self._solve(leaf_dict(hparams))

    def _solve(self, lam: dict[str, Tensor]) -> Solution:
        _check_autograd_available()
        return self.run(self.inner, self.init, lam, self.steps, **self.options)

    def hypergradient(self, hparams: Hparams) -> Result:
        """The hypergradient of f_T(lambda) = outer(w_T, lambda) at `hparams` (not modified;
        non-leaf ones stay connected, see Result.backward)."""
        if self.outer is None:
            raise ValueError("this problem has no outer objective: create it with one")
        _refuse_tracked_start(self.init)
        began = time.perf_counter()
        lam = leaf_dict(hparams)  # the method's leaves; pull_back adds the direct term on them
        solution = self._solve(lam)
        value, grads = pull_back(self.outer, solution, lam)
        return Result(
            grads=grads,
            params={k: v.detach() for k, v in solution.params.items()},
            value=value,
            method=self.method,
            seconds=time.perf_counter() - began,
            info={**getattr(solution, "info", {}), **self._auto_info()},
            hparams=dict(hparams),
        )

    def _auto_info(self) -> dict:
        return {} if self.auto is None else {"auto": copy.deepcopy(dict(self.auto))}

    def with_params(self, params: Params) -> Problem:
        """The same problem from another w_0 (a warm start): same keys, no re-validation."""
        if set(params) != set(self.inner.keys):
            raise ValueError(
                f"params must have the keys {sorted(self.inner.keys)}, got {sorted(params)}"
            )
        return dataclasses.replace(self, init=dict(params))


def hypergradient(
    inner: Objective,
    outer: Objective,
    params: Init,
    hparams: Hparams,
    dynamics: Dynamics,
    steps: int,
    method: str = "reverse",
    *,
    precision: Precision | str | torch.dtype | None = None,
    **options,
) -> Result:
    """The hypergradient of f_T(lambda) = outer(w_T, lambda) by the chosen method.

    Args:
        inner: L(params, hparams) -> scalar tensor, minimised by `dynamics`. To see the step
            number t = 1..T (a minibatch chosen by t), declare a third positional parameter
            without a default, or a parameter named `step` or `t`.
        outer: E(params, hparams) -> scalar tensor, evaluated at w_T.
        params: w_0 as a dict of tensors (a constant), or a callable hparams -> w_0 (a
            learned initialisation).
        hparams: dict of tensors that require grad; not modified, and non-leaf ones stay
            connected to what computed them (see Result.backward).
        dynamics: the inner optimiser (bilevel.sgd, adam, ...); its settings may be
            callables of the hyperparameters.
        steps: T, the number of inner steps.
        method: one of bilevel.METHODS ("reverse", "truncated", "forward", "implicit-cg",
            "implicit-neumann", "fixed-point", or "auto": the fastest exact one whose memory
            fits memory_budget, see Result.info["auto"]); `bilevel methods` lists their options.
        precision: None (everything in the tensors' dtype), "bf16", "fp16" or a
            bilevel.Precision: the inner objective under torch.autocast; parameters, the
            optimiser's state and the hypergradient in float32 (params must be float32).
        **options: the method's options (memory=..., k=..., iterations=..., memory_budget=...).
    Returns:
        A Result: grads, params (w_T), value (f_T), info.
    """
    problem = Problem.create(
        inner, outer, params, hparams, dynamics, steps, method, options, precision=precision
    )
    return problem.hypergradient(hparams)


def _initial_params(params: Init, hparams: Hparams) -> Params:
    if callable(params):
        # only to learn the keys: stay out of the user's graph and random stream (a random
        # Phi_0 must draw in the run what it would have drawn without this call)
        random = RandomState.capture(tuple(hparams.values()))
        with torch.no_grad(), random.restored():
            start = params({k: v.detach() for k, v in hparams.items()})
        validate.tensor_dict("params(hparams)", start)
    else:
        start = params
        validate.tensor_dict("params", start)
    return start


def _refuse_tracked_start(params: Init) -> None:
    if callable(params):
        return
    for key, tensor in params.items():
        if tensor.requires_grad:
            raise ValueError(
                f"params[{key!r}] requires grad, but hypergradient() treats w_0 as a "
                "constant: for a learned initialisation pass params=lambda h: {...} (a "
                "function of hparams), or use bilevel.solve; else pass it detached"
            )


def _check_autograd_available() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "bilevel needs autograd for the inner gradients, which torch.inference_mode() "
            "disables; use torch.no_grad() instead"
        )


def pull_back(outer: Objective, solution, lam: Mapping[str, Tensor]):
    """(E(w_T, lambda), its total derivative): the direct term plus the solution's pull-back."""
    w_T = leaf_dict(solution.params)
    with torch.enable_grad():
        value = evaluate("outer", outer, w_T, lam)
        if not value.requires_grad:
            raise ValueError(
                "the outer objective depends neither on params nor on hparams (its value has "
                "no autograd graph): did it detach, or go through .item() or numpy?"
            )
        direct = torch.autograd.grad(value, [*w_T.values(), *lam.values()], allow_unused=True)
    outer_value = float(value.detach())
    if not math.isfinite(outer_value):
        raise HypergradientError(
            f"the outer objective is {outer_value} at w_T (the inner run was finite): its "
            "hypergradient is undefined; check the outer objective at the inner solution"
        )
    for key, g in zip(w_T, direct):
        if g is not None and not bool(torch.isfinite(g).all()):
            raise HypergradientError(
                f"the gradient of the outer objective with respect to params[{key!r}] is NaN "
                f"or infinite at w_T although its value ({outer_value:.6g}) is finite: it is "
                "not differentiable there (sqrt or norm at 0, for instance)"
            )
    adjoint = {k: validate.zeros_if_none(g, w_T[k]) for k, g in zip(w_T, direct)}
    pulled, _ = solution.vjp(adjoint)
    direct_lam = direct[len(w_T) :]
    grads = {k: pulled[k] + validate.zeros_if_none(g, lam[k]) for k, g in zip(lam, direct_lam)}
    check_hypergradient(grads, getattr(getattr(solution, "problem", None), "precision", None))
    _warn_unused(outer, solution, lam, grads)
    return outer_value, grads


def _warn_unused(outer: Objective, solution, lam: Mapping[str, Tensor], grads) -> None:
    """Warn about hyperparameters that nothing depends on (their hypergradient is zero by
    construction). Only exactly-zero hypergradients are probed, so this is free otherwise."""
    zero = torch.stack([~g.any() for g in grads.values()])
    if not bool(zero.any()):
        return
    candidates = [k for k, z in zip(grads, zero.tolist()) if z]
    with RandomState.capture(tuple(lam.values())).restored():  # the probe draws nothing
        init = getattr(solution, "init", None)
        unused = unreached(solution.problem, init, outer, solution, lam)
    for key in [k for k in candidates if k in unused]:
        warnings.warn(
            f"hparams[{key!r}] affects neither the inner objective, the dynamics' settings, w_0 "
            "nor the outer objective: its hypergradient is zero",
            HypergradientWarning,
            stacklevel=3,
        )


def unreached(problem: InnerProblem, init, outer: Objective, solution, lam) -> set[str]:
    """Names of the hyperparameters that no part of the problem reads: one step with its graph
    from w_T, the outer objective there, and Phi_0 if w_0 is learned."""
    lam = leaf_dict(lam)
    params = leaf_dict(solution.params)
    with torch.enable_grad():
        z, _ = problem.step(problem.pack(params, problem.dynamics.init(params)), lam, 1)
        outputs = [*z, evaluate("outer", outer, params, lam)]
        if callable(init):
            outputs += list(init(lam).values())
        reached = torch.autograd.grad(
            [o.sum() for o in outputs if o.requires_grad], list(lam.values()), allow_unused=True
        )
    return {k for k, g in zip(lam, reached) if g is None}
