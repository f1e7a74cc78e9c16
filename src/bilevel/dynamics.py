"""Inner optimisers as pure, differentiable steps.

A `Dynamics` is a pair of pure functions over dicts of tensors:

    state = dynamics.init(params)
    params, state = dynamics.step(params, state, grads, hparams, t)

`state` is a tuple of dicts keyed like `params` (one dict per optimiser slot:
velocity, first and second moments). Nothing is modified in place, so every
step can be differentiated with respect to the parameters, the state and the
hyperparameters, in reverse or forward mode.

Every numeric setting is a `Setting`: a float, or a callable of the
hyperparameters returning a tensor (broadcast to every parameter) or a dict of
tensors keyed by parameter name (one value per group). That makes the
optimiser's own settings outer variables like any other, e.g.
`sgd(lr=lambda h: h["log_lr"].exp())`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = tuple[Params, ...]
Setting = float | Callable[[Mapping[str, Tensor]], Tensor | Mapping[str, Tensor]]

__all__ = ["Dynamics", "sgd", "nesterov", "adam", "resolve"]


@dataclass(frozen=True)
class Dynamics:
    """An inner optimiser: `init(params) -> state` and a pure `step`."""

    name: str
    init: Callable[[Params], State] = field(repr=False)
    step: Callable[..., tuple[Params, State]] = field(repr=False)
    lr: Setting = 0.0
    slots: tuple[str, ...] = ()
    regularize: Callable[[Params, Params, Mapping[str, Tensor]], Params] = field(
        default=lambda params, grads, hparams: grads, repr=False
    )

    def learning_rates(self, hparams: Mapping[str, Tensor]) -> Callable[[str], Tensor | float]:
        """The step size of each parameter under `hparams` (the Neumann solver uses it)."""
        return resolve(self.lr, hparams, "lr")

    def stationarity(self, params: Params, grads: Params, hparams) -> Params:
        """The map whose zero is a fixed point of the dynamics: dL/dw plus any weight decay."""
        return self.regularize(params, grads, hparams)


def resolve(
    setting: Setting, hparams: Mapping[str, Tensor], name: str = "setting", keys=None
) -> Callable[[str], Tensor | float]:
    """Evaluate a setting once per step; return its value for each parameter name.

    `name` (lr, momentum, ...) and the parameter `keys` only serve error messages.
    """
    if not callable(setting):
        return lambda key: setting
    try:
        value = setting(hparams)
    except KeyError as error:
        missing = error.args[0] if error.args else None
        if isinstance(missing, str) and missing not in hparams:
            raise KeyError(
                f"the {name} setting asked for hyperparameter {missing!r}, which is not in "
                f"hparams {sorted(hparams)}"
            ) from error
        raise
    if not isinstance(value, Mapping):
        return lambda key: value
    if keys is not None and set(value) - set(keys):
        raise KeyError(
            f"the per-group {name} setting has keys {sorted(set(value) - set(keys))} that are "
            f"not parameters; the parameters are {sorted(keys)}"
        )

    def per_group(key: str):
        if key not in value:
            raise KeyError(
                f"the per-group {name} setting returned keys {sorted(value)} but has no value "
                f"for parameter {key!r}"
            )
        return value[key]

    return per_group


def _check_float(label: str, value: Setting, low: float = 0.0, below: float | None = None):
    """A float setting must be a finite number in [low, below); callables are checked when
    they run. NaN passes every comparison, so finiteness is tested first."""
    if callable(value):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(
            f"{label} must be a float or a callable of the hyperparameters, got {value!r}"
        )
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{label} must be a finite number >= {low:g}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{label} must be < {below}, got {value}")


def _add_scaled(y: Tensor, a, x: Tensor, sign: float = 1.0) -> Tensor:
    """y + sign * a * x in one fused kernel: elementwise passes, not the matrix products,
    dominate forward mode (every op also runs on m tangents), so fewer of them pay."""
    if isinstance(a, Tensor):
        return torch.addcmul(y, a, x, value=sign)
    return torch.add(y, x, alpha=sign * a)


def _zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def _weight_decay(weight_decay: Setting):
    """Coupled L2 decay, g + wd * w; the identity when the decay is the float 0."""
    if not callable(weight_decay) and weight_decay == 0:
        return lambda params, grads, hparams: grads

    def regularize(params: Params, grads: Params, hparams) -> Params:
        wd = resolve(weight_decay, hparams, "weight_decay", params.keys())
        return {k: _add_scaled(g, wd(k), params[k]) for k, g in grads.items()}

    return regularize


def sgd(
    lr: Setting,
    momentum: Setting = 0.0,
    weight_decay: Setting = 0.0,
    nesterov: bool = False,
) -> Dynamics:
    """Gradient descent; heavy-ball momentum when `momentum` is not the float 0.

    Velocity follows PyTorch's convention: v = mu v + g; w = w - lr v
    (Nesterov: w = w - lr (g + mu v)).
    """
    _check_float("lr", lr)
    _check_float("momentum", momentum, below=1.0)
    _check_float("weight_decay", weight_decay)
    regularize = _weight_decay(weight_decay)
    plain = not callable(momentum) and momentum == 0
    if nesterov and plain:
        raise ValueError("nesterov=True needs a momentum other than 0")

    if plain:

        def step(params, state, grads, hparams, t):
            grads = regularize(params, grads, hparams)
            rate = resolve(lr, hparams, "lr", params.keys())
            return {k: _add_scaled(w, rate(k), grads[k], -1.0) for k, w in params.items()}, state

        return Dynamics("sgd", lambda params: (), step, lr, (), regularize)

    def step_momentum(params, state, grads, hparams, t):
        grads = regularize(params, grads, hparams)
        rate = resolve(lr, hparams, "lr", params.keys())
        mu = resolve(momentum, hparams, "momentum", params.keys())
        (velocity,) = state
        new_params, new_velocity = {}, {}
        for k, w in params.items():
            v = _add_scaled(grads[k], mu(k), velocity[k])
            direction = _add_scaled(grads[k], mu(k), v) if nesterov else v
            new_params[k] = _add_scaled(w, rate(k), direction, -1.0)
            new_velocity[k] = v
        return new_params, (new_velocity,)

    name = "nesterov" if nesterov else "momentum"
    init = lambda params: (_zeros_like(params),)  # noqa: E731
    return Dynamics(name, init, step_momentum, lr, ("velocity",), regularize)


def nesterov(lr: Setting, momentum: Setting, weight_decay: Setting = 0.0) -> Dynamics:
    """Nesterov momentum (shorthand for `sgd(..., nesterov=True)`)."""
    return sgd(lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt whose derivative at 0 is 0 instead of inf.

    Adam's second moment is exactly 0 where a gradient entry has always been 0;
    there d sqrt(v)/dv = inf meets dv/dg = 0 and plain sqrt gives NaN
    hypergradients. The double `where` keeps every derivative finite in reverse
    and forward mode alike.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0)


def adam(
    lr: Setting,
    betas: tuple[Setting, Setting] = (0.9, 0.999),
    eps: Setting = 1e-8,
    weight_decay: Setting = 0.0,
) -> Dynamics:
    """Adam with bias correction and coupled L2 weight decay, differentiable everywhere."""
    _check_float("lr", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_float("betas[0]", betas[0], below=1.0)
    _check_float("betas[1]", betas[1], below=1.0)
    _check_float("eps", eps)
    _check_float("weight_decay", weight_decay)
    regularize = _weight_decay(weight_decay)

    def step(params, state, grads, hparams, t):
        grads = regularize(params, grads, hparams)
        keys = params.keys()
        rate, epsilon = resolve(lr, hparams, "lr", keys), resolve(eps, hparams, "eps", keys)
        beta1 = resolve(betas[0], hparams, "betas[0]", keys)
        beta2 = resolve(betas[1], hparams, "betas[1]", keys)
        first, second = state
        new_params, new_first, new_second = {}, {}, {}
        for k, w in params.items():
            b1, b2, g = beta1(k), beta2(k), grads[k]
            m = b1 * first[k] + (1 - b1) * g
            v = b2 * second[k] + (1 - b2) * g * g
            update = (m / (1 - b1**t)) / (_safe_sqrt(v / (1 - b2**t)) + epsilon(k))
            new_params[k] = w - rate(k) * update
            new_first[k], new_second[k] = m, v
        return new_params, (new_first, new_second)

    def init(params):
        return (_zeros_like(params), _zeros_like(params))

    return Dynamics("adam", init, step, lr, ("first_moment", "second_moment"), regularize)
