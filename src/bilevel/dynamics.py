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

The implicit methods differentiate `Dynamics.stationarity`, whose zeros are the
fixed points of the step: dL/dw plus any coupled weight decay, or, where the
decay is decoupled from the gradient (`adamw`, `lion`), the optimiser's own map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import validate

Params = dict[str, Tensor]
State = tuple[Params, ...]
Setting = float | Callable[[Mapping[str, Tensor]], Tensor | Mapping[str, Tensor]]

__all__ = [
    "Dynamics",
    "adagrad",
    "adam",
    "adamw",
    "lion",
    "nesterov",
    "resolve",
    "rmsprop",
    "sgd",
]


@dataclass(frozen=True)
class Dynamics:
    """An inner optimiser: `init(params) -> state` and a pure `step`."""

    name: str
    init: Callable[[Params], State] = field(repr=False)
    step: Callable[..., tuple[Params, State]] = field(repr=False)
    lr: Setting = 0.0
    regularize: Callable[[Params, Params, Mapping[str, Tensor]], Params] = field(
        default=lambda params, grads, hparams: grads, repr=False
    )
    # the optimiser's own stationarity map where a fixed point of its step is not a zero of
    # regularize (decoupled weight decay: AdamW, Lion); None: regularize is the map
    stationary: Callable[[Params, Params, Mapping[str, Tensor]], Params] | None = field(
        default=None, repr=False
    )

    def learning_rates(self, hparams: Mapping[str, Tensor]) -> Callable[[str], Tensor | float]:
        """The step size of each parameter under `hparams` (the Neumann solver uses it)."""
        return resolve(self.lr, hparams, "lr")

    def stationarity(self, params: Params, grads: Params, hparams) -> Params:
        """The map whose zeros are the fixed points of the dynamics (the implicit methods
        differentiate it): dL/dw plus any coupled weight decay, or the optimiser's own map."""
        if self.stationary is not None:
            return self.stationary(params, grads, hparams)
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

        return Dynamics("sgd", lambda params: (), step, lr, regularize)

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
    return Dynamics(name, init, step_momentum, lr, regularize)


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


def _check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_float("betas[0]", betas[0], below=1.0)
    _check_float("betas[1]", betas[1], below=1.0)


def _check_adam_settings(lr, betas, eps, weight_decay) -> None:
    _check_float("lr", lr)
    _check_betas(betas)
    _check_float("eps", eps)
    _check_float("weight_decay", weight_decay)


def _resolve_each(hparams, keys, settings: Mapping[str, Setting]) -> list:
    """`resolve` every setting of one step, in order; the names serve error messages."""
    return [resolve(value, hparams, name, keys) for name, value in settings.items()]


def _ema(beta, average: Tensor, x: Tensor) -> Tensor:
    """beta * average + (1 - beta) * x: the moving averages of Adam, RMSprop and Lion."""
    return beta * average + (1 - beta) * x


def _decoupled_decay(weight_decay: Setting):
    """w - lr * wd * w, applied to the parameters and not to the gradient (AdamW, Lion);
    the identity when the decay is the float 0."""
    if not callable(weight_decay) and weight_decay == 0:
        return lambda params, rate, hparams: params

    def decay(params: Params, rate, hparams) -> Params:
        wd = resolve(weight_decay, hparams, "weight_decay", params.keys())
        return {k: _add_scaled(w, rate(k) * wd(k), w, -1.0) for k, w in params.items()}

    return decay


def _map_parameters(update, params: Params, grads: Params, state: State):
    """One step from a per-parameter rule `update(key, w, g, *slots) -> (w, *slots)`,
    regrouped into the (params, state) dicts of the `Dynamics` interface."""
    keys = list(params)
    rows = [update(k, params[k], grads[k], *(slot[k] for slot in state)) for k in keys]
    columns = list(zip(*rows))
    return dict(zip(keys, columns[0])), tuple(dict(zip(keys, c)) for c in columns[1:])


def _zero_slots(count: int) -> Callable[[Params], State]:
    return lambda params: tuple(_zeros_like(params) for _ in range(count))


def _adam_dynamics(name, lr, betas, eps, regularize, decay, stationary=None) -> Dynamics:
    """The step shared by Adam (coupled decay in `regularize`) and AdamW (`decay`)."""

    def step(params, state, grads, hparams, t):
        grads = regularize(params, grads, hparams)
        rate, epsilon, beta1, beta2 = _resolve_each(
            hparams,
            params.keys(),
            {"lr": lr, "eps": eps, "betas[0]": betas[0], "betas[1]": betas[1]},
        )
        params = decay(params, rate, hparams)

        def update(k, w, g, first, second):
            b1, b2 = beta1(k), beta2(k)
            m, v = _ema(b1, first, g), _ema(b2, second, g * g)
            direction = (m / (1 - b1**t)) / (_safe_sqrt(v / (1 - b2**t)) + epsilon(k))
            return w - rate(k) * direction, m, v

        return _map_parameters(update, params, grads, state)

    return Dynamics(name, _zero_slots(2), step, lr, regularize, stationary)


def adam(
    lr: Setting,
    betas: tuple[Setting, Setting] = (0.9, 0.999),
    eps: Setting = 1e-8,
    weight_decay: Setting = 0.0,
) -> Dynamics:
    """Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015) with
    coupled L2 weight decay, as torch.optim.Adam:

        g = dL/dw + wd w;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        w = w - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    Differentiable everywhere, zero gradients included (see `_safe_sqrt`).

    Args:
        lr: the learning rate.
        betas: the decay rates (beta1, beta2) of the two moments.
        eps: added to the denominator.
        weight_decay: the coupled (L2) weight decay wd.

    Each is a `Setting` (a float, or a callable of the hyperparameters, per group if it returns
    a dict); the defaults are torch's.

    Returns the `Dynamics` (slots first_moment, second_moment).
    """
    _check_adam_settings(lr, betas, eps, weight_decay)
    return _adam_dynamics(
        "adam", lr, betas, eps, _weight_decay(weight_decay), _decoupled_decay(0.0)
    )


def adamw(
    lr: Setting,
    betas: tuple[Setting, Setting] = (0.9, 0.999),
    eps: Setting = 1e-8,
    weight_decay: Setting = 1e-2,
) -> Dynamics:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019), as torch.optim.AdamW: w = w - lr wd w, then `adam`'s step
    on the plain gradient g = dL/dw.

    Args:
        lr: the learning rate.
        betas: the decay rates (beta1, beta2) of the two moments.
        eps: added to the denominator.
        weight_decay: the decoupled weight decay wd.

    Each is a `Setting` (a float, or a callable of the hyperparameters, per group if it returns
    a dict); the defaults are torch's.

    Returns the `Dynamics` (slots first_moment, second_moment).

    Implicit methods: a fixed point (t large, bias corrections 1) has m = g, v = g^2 and
    wd w = -g / (|g| + eps), which is not dL/dw + wd w = 0. Solved for g it is the zero of
    G(w) = dL/dw + eps wd w / (1 - wd |w|) on |wd w| < 1: the gradient of L plus a separable
    convex penalty (symmetric Jacobian), which implicit-cg/neumann differentiate. Once
    |g| << eps the step on w scales like lr / eps, so AdamW settles at that fixed point
    only when eps is not tiny against lr times the curvature of L; with eps = 1e-8 it
    usually hovers near it without converging, and the implicit methods do not describe
    f_T (check with `bilevel.check`, or use an unrolled method).
    """
    _check_adam_settings(lr, betas, eps, weight_decay)
    return _adam_dynamics(
        "adamw",
        lr,
        betas,
        eps,
        _weight_decay(0.0),
        _decoupled_decay(weight_decay),
        _adamw_stationarity(eps, weight_decay),
    )


def _adamw_stationarity(eps: Setting, weight_decay: Setting):
    def stationarity(params: Params, grads: Params, hparams) -> Params:
        epsilon, wd = _resolve_each(
            hparams, params.keys(), {"eps": eps, "weight_decay": weight_decay}
        )
        out = {}
        for k, w in params.items():
            shrink = wd(k) * w.abs()
            if bool((shrink >= 1).any()):  # one synchronisation per parameter, once per solve
                raise ValueError(
                    f"w_T is not a fixed point of adamw: |weight_decay * w| >= 1 in parameter "
                    f"{k!r}, where the decay outweighs any Adam update (|m / (sqrt(v) + eps)| "
                    "< 1); run more inner steps, or use an unrolled method (reverse, forward)"
                )
            out[k] = grads[k] + epsilon(k) * wd(k) * w / (1 - shrink)
        return out

    return stationarity


def rmsprop(
    lr: Setting,
    alpha: Setting = 0.99,
    eps: Setting = 1e-8,
    weight_decay: Setting = 0.0,
    momentum: Setting = 0.0,
    centered: bool = False,
) -> Dynamics:
    """RMSprop (Tieleman & Hinton, COURSERA Neural Networks for Machine Learning, lecture
    6.5, 2012; centered: Graves, "Generating Sequences With Recurrent Neural Networks",
    arXiv:1308.0850, 2013), as torch.optim.RMSprop:

        g = dL/dw + wd w;  s = alpha s + (1 - alpha) g^2
        centered: a = alpha a + (1 - alpha) g;  s_hat = s - a^2  (else s_hat = s)
        d = g / (sqrt(s_hat) + eps);  momentum: b = mu b + d, d = b;  w = w - lr d

    Args:
        lr: the learning rate (a `Setting`, as are the next four).
        alpha: the decay rate of the average of g^2, in [0, 1).
        eps: added to the denominator.
        weight_decay: the coupled weight decay wd.
        momentum: mu, in [0, 1); on when it is not the float 0.
        centered: normalise by the running variance rather than the second moment.

    Returns the `Dynamics`; slots square_average, then gradient_average (centered), then
    velocity (momentum).

    A fixed point has g = 0 (centered too: there s_hat = 0 and d = g / eps), so the
    implicit methods use dL/dw + wd w. A centered s_hat that rounds below 0 counts as 0
    (torch would give NaN).
    """
    _check_float("lr", lr)
    _check_float("alpha", alpha, below=1.0)
    _check_float("eps", eps)
    _check_float("weight_decay", weight_decay)
    _check_float("momentum", momentum, below=1.0)
    validate.boolean("centered", centered)
    regularize = _weight_decay(weight_decay)
    with_momentum = callable(momentum) or momentum != 0
    slots = ("square_average",) + ("gradient_average",) * centered + ("velocity",) * with_momentum

    def step(params, state, grads, hparams, t):
        grads = regularize(params, grads, hparams)
        rate, decay, epsilon, mu = _resolve_each(
            hparams,
            params.keys(),
            {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum},
        )

        def update(k, w, g, square, *rest):
            rest = list(rest)
            square = _ema(decay(k), square, g * g)
            new_slots, variance = [square], square
            if centered:
                average = _ema(decay(k), rest.pop(0), g)
                new_slots.append(average)
                variance = square - average * average
            direction = g / (_safe_sqrt(variance) + epsilon(k))
            if with_momentum:
                direction = _add_scaled(direction, mu(k), rest.pop(0))
                new_slots.append(direction)
            return _add_scaled(w, rate(k), direction, -1.0), *new_slots

        return _map_parameters(update, params, grads, state)

    return Dynamics("rmsprop", _zero_slots(len(slots)), step, lr, regularize)


def adagrad(
    lr: Setting,
    lr_decay: Setting = 0.0,
    weight_decay: Setting = 0.0,
    initial_accumulator_value: Setting = 0.0,
    eps: Setting = 1e-10,
) -> Dynamics:
    """Adagrad (Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011), as torch.optim.Adagrad:

        g = dL/dw + wd w;  s = s + g^2
        w = w - lr / (1 + (t - 1) lr_decay) * g / (sqrt(initial_accumulator_value + s) + eps)

    Args:
        lr: the learning rate (a `Setting`, as are the others).
        lr_decay: the learning rate's decay over steps.
        weight_decay: the coupled weight decay wd.
        initial_accumulator_value: the accumulator's start.
        eps: added to the denominator.

    Returns the `Dynamics`. Its slot sum_of_squares holds the sum of g^2 alone (torch's
    accumulator less its initial value, which is added at each step so that it too can be
    a hyperparameter). The accumulator only grows, so a fixed point has g = 0: the
    implicit methods use dL/dw + wd w.
    """
    _check_float("lr", lr)
    _check_float("lr_decay", lr_decay)
    _check_float("weight_decay", weight_decay)
    _check_float("initial_accumulator_value", initial_accumulator_value)
    _check_float("eps", eps)
    regularize = _weight_decay(weight_decay)
    settings = {
        "lr": lr,
        "lr_decay": lr_decay,
        "initial_accumulator_value": initial_accumulator_value,
        "eps": eps,
    }

    def step(params, state, grads, hparams, t):
        grads = regularize(params, grads, hparams)
        rate, decay, start, epsilon = _resolve_each(hparams, params.keys(), settings)

        def update(k, w, g, squares):
            squares = squares + g * g
            scale = rate(k) / (1 + (t - 1) * decay(k))
            return w - scale * g / (_safe_sqrt(start(k) + squares) + epsilon(k)), squares

        return _map_parameters(update, params, grads, state)

    return Dynamics("adagrad", _zero_slots(1), step, lr, regularize)


def lion(
    lr: Setting,
    betas: tuple[Setting, Setting] = (0.9, 0.99),
    weight_decay: Setting = 0.0,
) -> Dynamics:
    """Lion (Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, "Symbolic
    Discovery of Optimization Algorithms", NeurIPS 2023, Algorithm 2):

        c = beta1 m + (1 - beta1) g;  w = w - lr (sign(c) + wd w);  m = beta2 m + (1 - beta2) g

    with decoupled weight decay (torch.optim has no Lion).

    Args:
        lr: the learning rate (a `Setting`, as are the others).
        betas: (beta1, beta2), the interpolation and the momentum's decay rate.
        weight_decay: the decoupled weight decay wd.

    Returns the `Dynamics` (slot momentum).

    Hypergradients: sign() has derivative 0 wherever it is differentiable (autograd uses
    0 at 0 too), so w_T depends on the gradients only through their signs. It is piecewise
    constant in every hyperparameter that enters through the inner objective or the betas:
    the path of such a hyperparameter through the inner run contributes exactly 0, which
    is the derivative of f_T almost everywhere (f_T jumps where a sign flips, which no
    derivative sees). Only lr, weight_decay and w_0 carry hypergradients through the run.

    Implicit methods: a fixed point has m = g and sign(g) + wd w = 0: each coordinate at
    -sign(g) / wd on the box |w| <= 1/wd (Lion with this decay minimises L over that box:
    Chen, Liu, Liang & Liu, "Lion Secretly Solves Constrained Optimization", ICLR 2024), or
    exactly g = 0 and w = 0. The implicit methods differentiate G(w) = sign(dL/dw) + wd w,
    exact wherever no gradient entry is 0 (dw*/dlambda = -(w*/wd) dwd/dlambda). A
    minimiser of L inside the box is no fixed point (Lion oscillates around it by about
    lr): there use an unrolled method. Without weight decay there is no isolated fixed
    point: implicit-cg and implicit-neumann refuse the dynamics, and fixed-point does not
    converge (the step map is the identity in w).
    """
    _check_float("lr", lr)
    _check_betas(betas)
    _check_float("weight_decay", weight_decay)
    decay = _decoupled_decay(weight_decay)

    def step(params, state, grads, hparams, t):
        rate, beta1, beta2 = _resolve_each(
            hparams, params.keys(), {"lr": lr, "betas[0]": betas[0], "betas[1]": betas[1]}
        )
        params = decay(params, rate, hparams)

        def update(k, w, g, momentum):
            direction = torch.sign(_ema(beta1(k), momentum, g))
            return _add_scaled(w, rate(k), direction, -1.0), _ema(beta2(k), momentum, g)

        return _map_parameters(update, params, grads, state)

    stationary = _lion_stationarity(weight_decay)
    return Dynamics("lion", _zero_slots(1), step, lr, stationary=stationary)


def _lion_stationarity(weight_decay: Setting):
    def stationarity(params: Params, grads: Params, hparams) -> Params:
        wd = resolve(weight_decay, hparams, "weight_decay", params.keys())
        out = {}
        for k, w in params.items():
            if not bool(torch.as_tensor(wd(k) > 0).all()):
                raise ValueError(
                    f"lion without weight decay (weight_decay is 0 for parameter {k!r}) has "
                    "no isolated fixed point, so implicit differentiation does not apply "
                    "(fixed-point would not converge either): use an unrolled method "
                    "(reverse, truncated, forward)"
                )
            out[k] = torch.sign(grads[k]) + wd(k) * w
        return out

    return stationarity
