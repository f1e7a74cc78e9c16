"""Non-leaf hyperparameters, the autograd node, learned initialisation, batched tasks, modules."""

import pytest
import torch
from torch import nn

import bilevel

from .problems import DTYPE, relative_error

ALL_METHODS = [
    ("reverse", {}),
    ("reverse", {"memory": "trajectory"}),
    ("reverse", {"memory": "checkpoint"}),
    ("reverse", {"memory": "activations"}),
    ("truncated", {"k": 40}),
    ("forward", {}),
]


def _episodes(batch=3, shots=4, ways=2, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ways * shots, 4, generator=g, dtype=DTYPE)
    y = torch.arange(ways).repeat_interleave(shots).expand(batch, -1)
    xq = torch.randn(batch, ways * shots, 4, generator=g, dtype=DTYPE)
    net = nn.Sequential(nn.Linear(4, dim), nn.Tanh()).to(DTYPE)
    return x, y, xq, net


def _head_problem(features, y, query_features, lam=0.1):
    """One linear head per episode, stacked [B, d, N]: the meta-learning inner problem."""

    def inner(p, h):
        logits = h["support"] @ p["head"]
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        return ce / y.shape[1] + lam * (p["head"] ** 2).sum()

    def outer(p, h):
        logits = h["query"] @ p["head"]
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    return inner, outer


@pytest.mark.parametrize("method,options", ALL_METHODS[:4])
def test_non_leaf_hyperparameters_pass_gradients_upstream(method, options):
    """Features computed by a network are the hyperparameters; the network's weights get the
    hypergradient, equal to finite differences of f_T in the network's weights."""
    x, y, xq, net = _episodes()
    inner, outer = _head_problem(None, y, None)
    params = {"head": torch.zeros(3, 5, 2, dtype=DTYPE)}
    dynamics = bilevel.sgd(lr=0.5)

    def f(module):
        h = {"support": module(x), "query": module(xq)}
        w = bilevel.solve(inner, params, h, dynamics, 40, method, **options)
        return outer(w, h)

    net.zero_grad()
    f(net).backward()
    analytic = net[0].weight.grad.clone()
    # the same through hypergradient() + Result.backward()
    net.zero_grad()
    h = {"support": net(x), "query": net(xq)}
    bilevel.hypergradient(inner, outer, params, h, dynamics, 40, method, **options).backward()
    assert relative_error(net[0].weight.grad, analytic) < 1e-10
    # finite differences along one random direction of the first layer's weights
    direction = torch.randn_like(net[0].weight)
    eps = 1e-6
    with torch.no_grad():
        net[0].weight += eps * direction
        plus = float(f(net))
        net[0].weight -= 2 * eps * direction
        minus = float(f(net))
        net[0].weight += eps * direction
    numeric = (plus - minus) / (2 * eps)
    assert abs(float((analytic * direction).sum()) - numeric) < 1e-7 * max(1.0, abs(numeric))


@pytest.mark.parametrize("method,options", ALL_METHODS)
def test_batched_independent_tasks_stay_exact(method, options):
    """Stacked per-episode heads give, episode by episode, the hypergradient of that episode."""
    x, y, xq, net = _episodes()
    with torch.no_grad():
        support, query = net(x), net(xq)
    scale = torch.ones(3, 1, 1, dtype=DTYPE, requires_grad=True)  # one hyperparameter per task

    def run(s, q, yy, sc):
        inner, outer = _head_problem(None, yy, None)
        data = {"support": s, "query": q}

        def scaled_inner(p, h):
            return inner({"head": p["head"] * h["scale"]}, data)

        def outer_sum(p, h):  # a sum over episodes, so each episode's share is its own
            return outer(p, data) * len(yy)

        h = {"scale": sc}
        params = {"head": torch.zeros(len(yy), 5, 2, dtype=DTYPE)}
        return bilevel.hypergradient(
            scaled_inner, outer_sum, params, h, bilevel.sgd(lr=0.5), 40, method, **options
        )

    together = run(support, query, y, scale)
    for b in range(3):
        alone = run(support[b : b + 1], query[b : b + 1], y[b : b + 1], scale[b : b + 1])
        assert relative_error(together.grads["scale"][b], alone.grads["scale"][0]) < 1e-10
        assert relative_error(together.params["head"][b], alone.params["head"][0]) < 1e-12


@pytest.mark.parametrize("method,options", ALL_METHODS)
def test_learned_initialisation(method, options):
    """w_0 = Phi_0(lambda) (as in MAML): the hypergradient includes the path through w_0."""
    x = torch.randn(12, 3, dtype=DTYPE)
    y = torch.randn(12, dtype=DTYPE)
    hparams = {
        "w0": torch.randn(3, dtype=DTYPE, requires_grad=True),
        "log_lr": torch.tensor(-2.0, dtype=DTYPE, requires_grad=True),
    }

    def inner(p, h):
        return ((torch.tanh(x @ p["w"]) - y) ** 2).mean()

    def outer(p, h):
        return ((torch.tanh(x @ p["w"]) - 0.5 * y) ** 2).mean()

    def init(h):
        return {"w": 2.0 * h["w0"]}

    dynamics = bilevel.sgd(lr=lambda h: h["log_lr"].exp(), momentum=0.5)
    options = {"k": 25} if method == "truncated" else options
    report = bilevel.check(inner, outer, init, hparams, dynamics, 25, method, **options)
    assert report.passed(1e-7), str(report)


def test_solve_differentiates_with_respect_to_w0_too():
    x = torch.randn(8, 3, dtype=DTYPE)
    w0 = torch.randn(3, dtype=DTYPE, requires_grad=True)
    h = {"c": torch.tensor(0.3, dtype=DTYPE, requires_grad=True)}

    def inner(p, h):
        return ((x @ p["w"]).sin() ** 2).mean() + h["c"] * (p["w"] ** 2).sum()

    w = bilevel.solve(inner, {"w": w0}, h, bilevel.sgd(lr=0.2), 15, memory="checkpoint")
    w["w"].sum().backward()
    analytic = w0.grad.clone()
    numeric = torch.zeros(3, dtype=DTYPE)
    for i in range(3):
        shift = torch.zeros(3, dtype=DTYPE)
        shift[i] = 1e-6
        plus = bilevel.solve(inner, {"w": w0.detach() + shift}, h, bilevel.sgd(lr=0.2), 15)
        minus = bilevel.solve(inner, {"w": w0.detach() - shift}, h, bilevel.sgd(lr=0.2), 15)
        numeric[i] = (plus["w"].sum() - minus["w"].sum()) / 2e-6
    assert relative_error(analytic, numeric) < 1e-7


def test_hyperparameter_used_only_by_the_outer_objective_gets_its_direct_gradient():
    x = torch.randn(8, 2, dtype=DTYPE)
    h = {
        "l2": torch.tensor(0.1, dtype=DTYPE, requires_grad=True),
        "only_outer": torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True),
    }

    def inner(p, h):
        return ((x @ p["w"] - 1) ** 2).mean() + h["l2"] * (p["w"] ** 2).sum()

    def outer(p, h):
        return ((p["w"] - h["only_outer"]) ** 2).sum()

    for method in ("reverse", "forward", "implicit-cg"):
        r = bilevel.hypergradient(
            inner, outer, {"w": torch.zeros(2, dtype=DTYPE)}, h, bilevel.sgd(lr=0.1), 50, method
        )
        assert relative_error(r.grads["only_outer"], -2 * (r.params["w"] - h["only_outer"])) < 1e-12


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_any_module_with_batch_norm_as_the_inner_model(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).to(DTYPE)
    params, apply = bilevel.functional(model)
    x, xv = torch.randn(16, 3, dtype=DTYPE), torch.randn(8, 3, dtype=DTYPE)
    y, yv = x.sum(1, keepdim=True), xv.sum(1, keepdim=True)
    running_mean = model[1].running_mean.clone()

    def inner(p, h):
        return ((apply(p, x) - y) ** 2).mean() + h["wd"] * sum((v**2).sum() for v in p.values())

    def outer(p, h):
        return ((apply(p, xv) - yv) ** 2).mean()

    h = {"wd": torch.tensor(0.01, dtype=DTYPE, requires_grad=True)}
    report = bilevel.check(inner, outer, params, h, bilevel.sgd(lr=0.05, momentum=0.9), 10, method)
    assert report.passed(1e-7), str(report)
    assert torch.equal(model[1].running_mean, running_mean)  # the module is left as it was


@pytest.mark.parametrize("method,options", ALL_METHODS)
def test_learned_initialisation_through_the_solve_node(method, options):
    """The solve node's backward runs without grad mode: Phi_0 must still be differentiated."""
    x = torch.randn(12, 3, dtype=DTYPE)
    w0 = torch.randn(3, dtype=DTYPE)

    def inner(p, h):
        return ((torch.tanh(x @ p["w"]) - 1.0) ** 2).mean()

    def f(w0_value):
        h = {"w0": w0_value}
        options_ = {"k": 20} if method == "truncated" else options
        w = bilevel.solve(
            inner, lambda h: {"w": 2.0 * h["w0"]}, h, bilevel.sgd(lr=0.3), 20, method, **options_
        )
        return (w["w"] ** 2).sum()

    leaf = w0.clone().requires_grad_(True)
    f(leaf).backward()
    numeric = torch.stack(
        [(f(w0 + 1e-6 * e) - f(w0 - 1e-6 * e)) / 2e-6 for e in torch.eye(3, dtype=DTYPE)]
    )
    assert relative_error(leaf.grad, numeric) < 1e-7
