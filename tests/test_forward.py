"""Forward mode on what users write: 0-dim tensors, one-element objectives, PyTorch's losses,
dropout; each hypergradient against finite differences or another method (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel

from .problems import DTYPE, Ridge, relative_error

VECTORIZE = [True, False]


def _data(seed=0, n=24, d=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DTYPE)
    return X, X @ torch.randn(d, generator=g, dtype=DTYPE) + 0.3


class ZeroDim:
    """Regression with a 0-dim bias as an inner parameter; a 0-dim L2 weight on it and a 0-dim
    target shift as hyperparameters, beside a vector one."""

    def __init__(self):
        self.X, self.y = _data()
        self.Xv, self.yv = _data(seed=1)

    def inner(self, p, h):
        r = self.X @ p["w"] + p["b"] - self.y - h["shift"]
        penalty = (h["log_l2"].exp() * p["w"] ** 2).sum() + h["log_l2_b"].exp() * p["b"] ** 2
        return 0.5 * (r @ r) / len(r) + 0.5 * penalty

    def outer(self, p, h):
        r = self.Xv @ p["w"] + p["b"] - self.yv
        return 0.5 * (r @ r) / len(r)

    def params(self):
        return {"w": torch.zeros(3, dtype=DTYPE), "b": torch.tensor(0.5, dtype=DTYPE)}

    def hparams(self):
        values = {"log_l2": [-1.0, -2.0, -1.5], "log_l2_b": -1.0, "shift": 0.2}
        return {k: torch.tensor(v, dtype=DTYPE, requires_grad=True) for k, v in values.items()}


@pytest.mark.parametrize("vectorize", VECTORIZE)
def test_zero_dim_parameters_and_hyperparameters(vectorize):
    problem = ZeroDim()
    dynamics = bilevel.sgd(lr=0.2, momentum=0.5)
    args = (problem.inner, problem.outer, problem.params(), problem.hparams(), dynamics, 15)
    report = bilevel.check(*args, "forward", vectorize=vectorize)
    assert report.passed(1e-6), report
    # a learned initialisation of the 0-dim parameter: its tangents start non-zero
    hparams = {**problem.hparams(), "b0": torch.tensor(0.3, dtype=DTYPE, requires_grad=True)}
    init = lambda h: {"w": torch.zeros(3, dtype=DTYPE), "b": 2 * h["b0"]}  # noqa: E731
    report = bilevel.check(problem.inner, problem.outer, init, hparams, dynamics, 15, "forward")
    assert report.passed(1e-6), report


@pytest.mark.parametrize("vectorize", VECTORIZE)
def test_real_time_loop_with_a_zero_dim_parameter(vectorize):
    problem = ZeroDim()
    hparams = problem.hparams()
    dynamics = bilevel.sgd(lr=0.2)
    optimizer = torch.optim.SGD(list(hparams.values()), lr=0.0)
    loop = bilevel.RealTimeHyperOptimizer(
        problem.inner, problem.outer, problem.params(), hparams, dynamics, 10, optimizer,
        vectorize=vectorize,
    )  # fmt: skip
    loop.step()
    reference = bilevel.hypergradient(
        problem.inner, problem.outer, problem.params(), hparams, dynamics, 10, "reverse"
    )
    for k, v in hparams.items():
        assert relative_error(v.grad, reference.grads[k]) < 1e-12


def test_real_time_solver_refuses_hyperparameters_of_another_layout():
    ridge = Ridge()
    args = (ridge.params(), ridge.hparams(), bilevel.sgd(lr=0.3), 5, "forward")
    problem = bilevel.Problem.create(ridge.inner, ridge.outer, *args)
    solver = bilevel.hypergrad.ForwardSolver(problem.inner, ridge.params(), ridge.hparams())
    solver.set_hparams({"gamma": torch.zeros(6, dtype=DTYPE)})  # new values: fine
    with pytest.raises(ValueError, match=r"started with keys and shapes \{'gamma': \(6,\)\}"):
        solver.set_hparams({"gamma": torch.zeros(2, 3, dtype=DTYPE)})


ALL_METHODS = [
    ("reverse", {}),
    ("reverse", {"memory": "trajectory"}),
    ("reverse", {"memory": "checkpoint"}),
    ("truncated", {"k": 5}),
    ("forward", {}),
    ("forward", {"vectorize": False}),
    ("implicit-cg", {}),
    ("implicit-neumann", {}),
    ("fixed-point", {}),
]


@pytest.mark.parametrize("method,options", ALL_METHODS)
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_one_element_objectives_count_as_scalars_for_every_method(method, options, shape):
    ridge, steps, lr = Ridge(), 30, 0.3
    inner = lambda p, h: ridge.inner(p, h).reshape(shape)  # noqa: E731
    outer = lambda p, h: ridge.outer(p, h).reshape(shape)  # noqa: E731
    args = (ridge.params(), ridge.hparams(), bilevel.sgd(lr=lr), steps, method)
    result = bilevel.hypergradient(inner, outer, *args, **options)
    scalar = bilevel.hypergradient(ridge.inner, ridge.outer, *args, **options)
    assert relative_error(result.grads["gamma"], scalar.grads["gamma"]) < 1e-12
    assert result.value == scalar.value
    if method in ("reverse", "forward"):  # the full unroll: f_T in closed form
        value, grad = ridge.exact_T(steps, lr)
        assert abs(result.value - value) <= 1e-12 * abs(value)
        assert relative_error(result.grads["gamma"], grad) < 1e-10
    # the same objectives through the autograd node
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    w_T = bilevel.solve(inner, ridge.params(), {"gamma": gamma}, bilevel.sgd(lr=lr), steps,
                        method, **options)  # fmt: skip
    outer(w_T, None).sum().backward()
    assert relative_error(gamma.grad, scalar.grads["gamma"]) < 1e-12


def test_objectives_of_more_than_one_element_are_still_refused():
    ridge = Ridge()
    inner = lambda p, h: ridge.inner(p, h).reshape(1).expand(2)  # noqa: E731
    args = (ridge.outer, ridge.params(), ridge.hparams(), bilevel.sgd(lr=0.3), 5, "forward")
    with pytest.raises(ValueError, match=r"inner objective must return a scalar.*\(2,\)"):
        bilevel.hypergradient(inner, *args)


LOSSES = {
    "mse_loss": lambda prediction, target: F.mse_loss(prediction, target),
    # delta inside the residuals' range: both the quadratic and the linear branch are used
    "huber_loss": lambda prediction, target: F.huber_loss(prediction, target, delta=0.5),
}


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_pytorch_losses_in_the_inner_objective(loss, vectorize):
    X, y = _data(n=30)
    Xv, yv = _data(seed=2, n=20)
    criterion = LOSSES[loss]

    def inner(p, h):
        return criterion(X @ p["w"], y) + 0.5 * (h["log_l2"].exp() * p["w"] ** 2).sum()

    def outer(p, h):
        return criterion(Xv @ p["w"], yv)

    params = {"w": torch.zeros(3, dtype=DTYPE)}
    hparams = {"log_l2": torch.tensor([-1.0, -2.0, -3.0], dtype=DTYPE, requires_grad=True)}
    report = bilevel.check(inner, outer, params, hparams, bilevel.sgd(lr=0.1, momentum=0.5), 20,
                           "forward", vectorize=vectorize)  # fmt: skip
    assert report.passed(1e-6), report


def _dropout_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g, dtype=DTYPE)
    y = torch.randn(32, 1, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1)).to(DTYPE)
    params, apply = bilevel.functional(net)  # training mode: a fresh mask at every call

    def inner(p, h):
        decay = h["log_wd"].exp() * (p["0.weight"] ** 2).sum()
        return ((apply(p, X * h["scale"]) - y) ** 2).mean() + decay

    def outer(p, h):
        return ((apply(p, X) - y) ** 2).mean()

    hparams = {
        "log_wd": torch.tensor(-3.0, dtype=DTYPE, requires_grad=True),
        "scale": torch.ones(4, dtype=DTYPE, requires_grad=True),
    }
    return inner, outer, params, hparams


@pytest.mark.parametrize("vectorize", VECTORIZE)
def test_dropout_sees_the_masks_of_reverse_mode(vectorize):
    inner, outer, params, hparams = _dropout_problem()
    dynamics, steps = bilevel.sgd(lr=0.1, momentum=0.5), 8

    def run(method, lam=hparams, **options):
        torch.manual_seed(7)
        return bilevel.hypergradient(inner, outer, params, lam, dynamics, steps, method, **options)

    reverse = run("reverse", memory="graph")
    forward = run("forward", vectorize=vectorize)
    assert forward.value == reverse.value
    for k in hparams:
        assert relative_error(forward.grads[k], reverse.grads[k]) < 1e-10
    # with the seed fixed f_T is a deterministic function: central differences along a direction
    direction = {
        "log_wd": torch.tensor(0.6, dtype=DTYPE),
        "scale": torch.full((4,), 0.4, dtype=DTYPE),
    }
    eps = 1e-6
    shifted = [
        {k: (v.detach() + s * eps * direction[k]).requires_grad_(True) for k, v in hparams.items()}
        for s in (1, -1)
    ]
    numeric = (run("reverse", shifted[0]).value - run("reverse", shifted[1]).value) / (2 * eps)
    analytic = sum(float((forward.grads[k] * direction[k]).sum()) for k in hparams)
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric)
