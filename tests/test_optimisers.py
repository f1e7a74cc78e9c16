"""AdamW, RMSprop, Adagrad and Lion: the same trajectories as their references, exact
hypergradients under every method (zero gradients included), the right fixed points for
the implicit methods, and bad settings refused by name."""

import math

import numpy as np
import pytest
import torch

import bilevel

from .problems import DTYPE, Ridge, SmallMLP, relative_error
from .test_dynamics import _run_ours

# -- settings -------------------------------------------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]

# every float setting of every factory, with the other arguments it needs
FLOAT_SETTINGS = [
    (bilevel.sgd, "lr", {}),
    (bilevel.sgd, "momentum", {"lr": 0.1}),
    (bilevel.sgd, "weight_decay", {"lr": 0.1}),
    (bilevel.nesterov, "lr", {"momentum": 0.5}),
    (bilevel.nesterov, "momentum", {"lr": 0.1}),
    (bilevel.nesterov, "weight_decay", {"lr": 0.1, "momentum": 0.5}),
    (bilevel.adam, "lr", {}),
    (bilevel.adam, "eps", {"lr": 0.1}),
    (bilevel.adam, "weight_decay", {"lr": 0.1}),
    (bilevel.adamw, "lr", {}),
    (bilevel.adamw, "eps", {"lr": 0.1}),
    (bilevel.adamw, "weight_decay", {"lr": 0.1}),
    (bilevel.rmsprop, "lr", {}),
    (bilevel.rmsprop, "alpha", {"lr": 0.1}),
    (bilevel.rmsprop, "eps", {"lr": 0.1}),
    (bilevel.rmsprop, "weight_decay", {"lr": 0.1}),
    (bilevel.rmsprop, "momentum", {"lr": 0.1}),
    (bilevel.adagrad, "lr", {}),
    (bilevel.adagrad, "lr_decay", {"lr": 0.1}),
    (bilevel.adagrad, "weight_decay", {"lr": 0.1}),
    (bilevel.adagrad, "initial_accumulator_value", {"lr": 0.1}),
    (bilevel.adagrad, "eps", {"lr": 0.1}),
    (bilevel.lion, "lr", {}),
    (bilevel.lion, "weight_decay", {"lr": 0.1}),
]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("factory,name,others", FLOAT_SETTINGS)
def test_non_finite_settings_are_refused_by_name(factory, name, others, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        factory(**others, **{name: value})


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("factory", [bilevel.adam, bilevel.adamw, bilevel.lion])
def test_non_finite_betas_are_refused_by_name(factory, index, value):
    betas = [0.9, 0.99]
    betas[index] = value
    with pytest.raises(ValueError, match=rf"^betas\[{index}\] must be a finite number"):
        factory(lr=0.1, betas=tuple(betas))


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: bilevel.rmsprop(lr=0.1, alpha=1.0), ValueError, "alpha must be < 1.0"),
        (lambda: bilevel.rmsprop(lr=0.1, momentum=-0.1), ValueError, "momentum must be a fin"),
        (lambda: bilevel.rmsprop(lr=0.1, centered=1), TypeError, "centered must be True or"),
        (lambda: bilevel.adagrad(lr=0.1, lr_decay=-1.0), ValueError, "lr_decay must be a fin"),
        (lambda: bilevel.adamw(lr=0.1, weight_decay=-0.1), ValueError, "weight_decay must be"),
        (lambda: bilevel.lion(lr=0.1, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be < 1"),
        (lambda: bilevel.lion(lr=0.1, betas=0.9), ValueError, "betas must be a pair"),
        (lambda: bilevel.lion(lr="fast"), TypeError, "lr must be a float or a callable"),
    ],
)
def test_bad_settings_of_the_new_optimisers_are_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


def _one_step(dynamics, params, grads):
    new, _ = dynamics.step(params, dynamics.init(params), grads, {}, 1)
    return new


def test_per_group_settings_reach_their_parameters():
    """One step by hand, with g = 2 everywhere: a per-group value reaches the parameter it
    names, and a setting torch keeps in the optimiser's state (Adagrad's initial
    accumulator) is a hyperparameter like the others."""
    mlp = SmallMLP()
    grads = {k: torch.full_like(v, 2.0) for k, v in mlp.w0.items()}
    rates = {"W1": torch.tensor(0.1, dtype=DTYPE), "b1": 0.2, "W2": 0.3}
    new = _one_step(bilevel.rmsprop(lr=lambda h: rates, alpha=0.5, eps=0.0), mlp.w0, grads)
    for k, lr in rates.items():  # s = 0.5 * 4 = 2: the step is lr * 2 / sqrt(2)
        assert torch.allclose(new[k], mlp.w0[k] - float(lr) * math.sqrt(2.0))
    starts = {"W1": 5.0, "b1": 0.0, "W2": 12.0}
    adagrad = bilevel.adagrad(lr=1.0, initial_accumulator_value=lambda h: starts, eps=0.0)
    new = _one_step(adagrad, mlp.w0, grads)
    for k, start in starts.items():  # the step is 2 / sqrt(start + 4)
        assert torch.allclose(new[k], mlp.w0[k] - 2.0 / math.sqrt(start + 4.0))


# -- Lion against the paper's update, written again in numpy --------------------------------


def _numpy_gradients(mlp, weights):
    """dL/dw at numpy weights (autograd is only the gradient oracle here)."""
    leaves = {k: torch.from_numpy(v).requires_grad_(True) for k, v in weights.items()}
    grads = torch.autograd.grad(mlp.inner(leaves, None), list(leaves.values()))
    return {k: g.numpy() for k, g in zip(leaves, grads)}


def _lion_numpy(mlp, steps, lr, beta1, beta2, weight_decay):
    """Chen et al. 2023, Algorithm 2: c = b1 m + (1 - b1) g; w -= lr (sign(c) + wd w);
    m = b2 m + (1 - b2) g. `weight_decay` is one float per parameter name."""
    w = {k: v.numpy().copy() for k, v in mlp.w0.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    for _ in range(steps):
        g = _numpy_gradients(mlp, w)
        for k in w:
            c = beta1 * m[k] + (1 - beta1) * g[k]
            w[k] = w[k] - lr * (np.sign(c) + weight_decay[k] * w[k])
            m[k] = beta2 * m[k] + (1 - beta2) * g[k]
    return w


@pytest.mark.parametrize(
    "decay", [{"W1": 0.0, "b1": 0.0, "W2": 0.0}, {"W1": 0.5, "b1": 0.0, "W2": 2.0}]
)
def test_lion_follows_the_papers_update(decay):
    mlp = SmallMLP()
    ours = bilevel.lion(lr=0.01, betas=(0.8, 0.95), weight_decay=lambda h: decay)
    a = _run_ours(ours, mlp, 25)
    b = _lion_numpy(mlp, 25, 0.01, 0.8, 0.95, decay)
    for k in a:
        assert relative_error(a[k], torch.from_numpy(b[k])) < 1e-12, k
    assert relative_error(a["W1"], mlp.w0["W1"]) > 1e-2  # it moved


# -- exact hypergradients under every unrolled method ---------------------------------------


class TunedMLP(SmallMLP):
    """SmallMLP with a hyperparameter in the objective (an L2 weight on W2) beside those of
    the optimiser (lr, a per-group weight decay, and `knob` for one optimiser-specific
    setting each)."""

    def inner(self, p, h):
        return super().inner(p, h) + h["log_l2"].exp() * (p["W2"] ** 2).sum()

    def hparams(self):
        more = {"log_l2": -2.0, "knob": 0.0}
        more = {k: torch.tensor(v, dtype=DTYPE, requires_grad=True) for k, v in more.items()}
        return {**super().hparams(), **more}

    def decay(self, scale):
        return lambda h: {k: scale * v for k, v in self.weight_decay(h).items()}

    def dynamics(self, kind):
        def lr(scale):
            return lambda h: scale * h["log_lr"].exp()

        def knob(scale):
            return lambda h: scale * h["knob"].exp()

        if kind == "adamw":
            return bilevel.adamw(lr(0.2), (0.8, 0.95), eps=knob(1e-3), weight_decay=self.decay(20))
        if kind == "rmsprop":
            return bilevel.rmsprop(lr(0.1), alpha=0.9, eps=knob(1e-3), weight_decay=self.decay(1))
        if kind == "rmsprop-centered-momentum":
            return bilevel.rmsprop(
                lr(0.05), momentum=knob(0.5), centered=True, weight_decay=self.decay(1)
            )
        if kind == "adagrad":
            return bilevel.adagrad(
                lr(1.0),
                lr_decay=0.05,
                weight_decay=self.decay(1),
                initial_accumulator_value=knob(0.1),
            )
        assert kind == "lion"
        return bilevel.lion(lr(0.1), betas=(knob(0.8), 0.95), weight_decay=self.decay(20))


KINDS = ["adamw", "rmsprop", "rmsprop-centered-momentum", "adagrad", "lion"]
UNROLLED = [
    ("reverse", {"memory": "graph"}),
    ("reverse", {"memory": "trajectory"}),
    ("reverse", {"memory": "checkpoint"}),
    ("reverse", {"memory": "activations"}),
    ("truncated", {"k": 20}),  # k = T: the truncated gradient is then the gradient of f_T
    ("forward", {}),
]


def _assert_matches(report, tolerance=1e-7):
    """Overall, and per direction so that a small component cannot hide behind a large one
    (the check's numbers are float32; central differences of these f_T, of order 1, carry
    about 1e-9 of rounding)."""
    assert report.passed(tolerance), str(report)
    for a, n in zip(report.analytic.tolist(), report.numeric.tolist()):
        assert abs(a - n) <= 1e-5 * abs(n) + 2e-9, str(report)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,options", UNROLLED)
def test_unrolled_methods_match_finite_differences(kind, method, options):
    mlp = TunedMLP()
    hparams = mlp.hparams()
    report = bilevel.check(
        mlp.inner, mlp.outer, mlp.w0, hparams, mlp.dynamics(kind), 20, method, **options
    )
    _assert_matches(report)
    assert all(abs(x) > 1e-6 for x in report.analytic[:3].tolist())  # lr and decay matter
    if kind == "lion":  # sign() passes nothing back: only lr and weight decay reach w_T
        assert report.analytic[3:].tolist() == [0.0, 0.0]
    else:
        assert all(abs(x) > 1e-6 for x in report.analytic[3:].tolist())


# -- finite hypergradients where gradient entries are exactly zero ---------------------------


def _zero_gradient_problem():
    """w[2] meets an all-zero column and `unused` is not in the objective: their gradients
    are exactly 0 at every step, so every second moment and accumulator there stays 0."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    x[:, 2] = 0

    def inner(p, h):
        return ((x @ p["w"] - h["target"]) ** 2).mean()

    def outer(p, h):
        return ((x @ p["w"]) ** 2).mean() + (p["w"] ** 2).sum() + (p["unused"] ** 2).sum()

    params = {"w": torch.zeros(3, dtype=DTYPE), "unused": torch.zeros(2, dtype=DTYPE)}
    hparams = {
        "log_lr": torch.tensor(-3.0, dtype=DTYPE, requires_grad=True),
        "target": torch.tensor(1.0, dtype=DTYPE, requires_grad=True),
    }
    return inner, outer, params, hparams


ZERO_GRADIENT_DYNAMICS = {
    "adamw": lambda lr: bilevel.adamw(lr, weight_decay=0.1),
    "rmsprop": lambda lr: bilevel.rmsprop(lr, weight_decay=0.1),
    "rmsprop-centered-momentum": lambda lr: bilevel.rmsprop(lr, momentum=0.5, centered=True),
    "adagrad": lambda lr: bilevel.adagrad(lr, weight_decay=0.1),
    "lion": lambda lr: bilevel.lion(lr, weight_decay=0.1),
}


@pytest.mark.parametrize("kind", ZERO_GRADIENT_DYNAMICS)
@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_zero_gradient_entries_give_finite_exact_hypergradients(kind, method):
    inner, outer, params, hparams = _zero_gradient_problem()
    dynamics = ZERO_GRADIENT_DYNAMICS[kind](lambda h: 10 * h["log_lr"].exp())
    result = bilevel.hypergradient(inner, outer, params, hparams, dynamics, 15, method)
    assert all(bool(torch.isfinite(g).all()) for g in result.grads.values())
    assert result.params["w"][2] == 0 and bool((result.params["unused"] == 0).all())
    report = bilevel.check(inner, outer, params, hparams, dynamics, 15, method)
    _assert_matches(report)
    assert report.analytic[0] != 0  # the learning rate moves w_T


# -- implicit methods: each optimiser's own fixed point --------------------------------------


def _ridge_hparams(ridge):
    more = {"log_wd": -1.0, "log_eps": -1.0}
    more = {k: torch.tensor(v, dtype=DTYPE, requires_grad=True) for k, v in more.items()}
    return {**ridge.hparams(), **more}


def _decay(h):
    return h["log_wd"].exp()


def _eps(h):
    return h["log_eps"].exp()


# eps large enough against lr times the curvature for the fixed point to attract
FIXED_POINT_DYNAMICS = {
    "adamw": lambda: bilevel.adamw(lr=0.1, betas=(0.5, 0.9), eps=_eps, weight_decay=_decay),
    "rmsprop-centered-momentum": lambda: bilevel.rmsprop(
        lr=0.05, alpha=0.9, eps=_eps, weight_decay=_decay, momentum=0.5, centered=True
    ),
    "adagrad": lambda: bilevel.adagrad(
        lr=0.5, lr_decay=1e-3, weight_decay=_decay, initial_accumulator_value=0.1, eps=_eps
    ),
}
IMPLICIT = [("implicit-cg", {}), ("implicit-neumann", {"alpha": 0.3}), ("fixed-point", {})]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", FIXED_POINT_DYNAMICS)
@pytest.mark.parametrize("method,options", IMPLICIT)
def test_implicit_methods_at_the_fixed_point_of_each_optimiser(kind, method, options):
    """A hyperparameter of the objective (the ridge weights gamma) and two of the optimiser
    (its weight decay and eps, which moves AdamW's fixed point): every implicit method
    against finite differences of f_T, with T large enough that w_T is the fixed point."""
    ridge = Ridge()
    hparams = _ridge_hparams(ridge)
    dynamics = FIXED_POINT_DYNAMICS[kind]()
    report = bilevel.check(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        hparams,
        dynamics,
        400,
        method,
        directions=3,
        **options,
    )
    _assert_matches(report)


def test_adamw_fixed_point_is_not_a_zero_of_the_coupled_map():
    """Why AdamW has its own stationarity map: at its fixed point dL/dw + wd w is far from
    0, while dL/dw + eps wd w / (1 - wd |w|) is 0 to rounding."""
    ridge = Ridge()
    hparams = {k: v.detach() for k, v in _ridge_hparams(ridge).items()}
    dynamics = FIXED_POINT_DYNAMICS["adamw"]()
    w = bilevel.solve(ridge.inner, ridge.params(), hparams, dynamics, 400)
    w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    (g,) = torch.autograd.grad(ridge.inner(w, hparams), [w["w"]])
    decay, eps = float(_decay(hparams)), float(_eps(hparams))
    coupled = g + decay * w["w"]
    assert float(coupled.detach().abs().max()) > 1e-2
    ours = dynamics.stationarity(w, {"w": g}, hparams)["w"]
    expected = g + eps * decay * w["w"] / (1 - decay * w["w"].abs())
    assert torch.equal(ours, expected)
    assert float(ours.detach().abs().max()) < 1e-12


def test_adamw_refuses_an_iterate_that_cannot_be_its_fixed_point():
    ridge = Ridge()
    params = {"w": torch.full((ridge.d,), 10.0, dtype=DTYPE)}  # |wd w| = 3.7 > 1
    dynamics = FIXED_POINT_DYNAMICS["adamw"]()
    with pytest.raises(ValueError, match="not a fixed point of adamw.*'w'"):
        bilevel.hypergradient(
            ridge.inner, ridge.outer, params, _ridge_hparams(ridge), dynamics, 3, "implicit-cg"
        )


class BoxedQuadratic:
    """L = |w - target|^2 / 2 with every |target_i| > 1/wd: Lion's gradient keeps its sign,
    and it converges to the corner w* = sign(target) / wd of the box |w| <= 1/wd. So
    f = |w* - y|^2 in closed form: df/dlog_wd = -2 (w* - y) . w*, and 0 for target and lr."""

    y = torch.tensor([0.5, 0.2, -0.3], dtype=DTYPE)

    def inner(self, p, h):
        return 0.5 * ((p["w"] - h["target"]) ** 2).sum()

    def outer(self, p, h):
        return ((p["w"] - self.y) ** 2).sum()

    def params(self):
        return {"w": torch.zeros(3, dtype=DTYPE)}

    def hparams(self):
        values = {"target": [3.0, -2.5, 4.0], "log_wd": 0.2, "log_lr": -2.0}
        return {k: torch.tensor(v, dtype=DTYPE, requires_grad=True) for k, v in values.items()}

    def exact_gradient(self, hparams):
        w = torch.sign(hparams["target"].detach()) / float(hparams["log_wd"].detach().exp())
        return -2 * float((w - self.y) @ w)

    def dynamics(self):
        lr = lambda h: h["log_lr"].exp()  # noqa: E731
        return bilevel.lion(lr, betas=(0.9, 0.9), weight_decay=lambda h: h["log_wd"].exp())


@pytest.mark.e2e
@pytest.mark.parametrize("method,options", [("reverse", {}), *IMPLICIT])
def test_lion_hypergradient_at_its_fixed_point(method, options):
    box = BoxedQuadratic()
    hparams = box.hparams()
    result = bilevel.hypergradient(
        box.inner, box.outer, box.params(), hparams, box.dynamics(), 500, method, **options
    )
    exact = box.exact_gradient(hparams)  # the solvers stop at relative residual 1e-10
    assert abs(float(result.grads["log_wd"]) - exact) < 1e-8 * abs(exact)
    assert float(result.grads["target"].abs().max()) < 1e-12
    assert abs(float(result.grads["log_lr"])) < 1e-10
    report = bilevel.check(
        box.inner, box.outer, box.params(), hparams, box.dynamics(), 500, method, **options
    )
    _assert_matches(report)


def test_lion_without_weight_decay_is_refused_by_the_implicit_solvers():
    box = BoxedQuadratic()
    dynamics = bilevel.lion(lr=0.01)
    with pytest.raises(ValueError, match="lion without weight decay.*unrolled method"):
        bilevel.hypergradient(
            box.inner, box.outer, box.params(), box.hparams(), dynamics, 10, "implicit-cg"
        )
    with (  # lion(lr=0.01) reads neither log_wd nor log_lr: that is said too
        pytest.warns(bilevel.HypergradientWarning, match="log_wd|log_lr"),
        pytest.warns(bilevel.SolverWarning, match="stopped after 50 iterations"),
    ):
        bilevel.hypergradient(
            box.inner,
            box.outer,
            box.params(),
            box.hparams(),
            dynamics,
            10,
            "fixed-point",
            iterations=50,
        )
