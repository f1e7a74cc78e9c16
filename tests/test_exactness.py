"""Every method against closed forms on ridge regression (float64)."""

import pytest
import torch

import bilevel

from .problems import Ridge, relative_error

LR, T = 0.3, 100
REVERSE_VARIANTS = [
    ("reverse", {}),
    ("reverse", {"memory": "trajectory"}),
    ("reverse", {"memory": "checkpoint"}),
    ("reverse", {"memory": "checkpoint", "checkpoint_every": 7}),
    ("reverse", {"memory": "activations"}),
    ("truncated", {"k": T}),
    ("truncated", {"k": T, "memory": "trajectory"}),
    ("truncated", {"k": T, "memory": "activations"}),
    ("forward", {}),
    ("forward", {"vectorize": False}),
]


@pytest.fixture(scope="module")
def ridge():
    return Ridge()


@pytest.mark.parametrize("method,options", REVERSE_VARIANTS)
def test_unrolled_methods_match_closed_form_of_f_T(ridge, method, options):
    result = bilevel.hypergradient(
        ridge.inner,
        ridge.outer,
        ridge.params(),
        ridge.hparams(),
        bilevel.sgd(lr=LR),
        T,
        method,
        **options,
    )
    value, grad = ridge.exact_T(T, LR)
    assert abs(result.value - value) <= 1e-12 * abs(value)
    assert relative_error(result.grads["gamma"], grad) < 1e-10


def test_unrolled_methods_agree_with_each_other(ridge):
    grads = [
        bilevel.hypergradient(
            ridge.inner,
            ridge.outer,
            ridge.params(),
            ridge.hparams(),
            bilevel.sgd(lr=LR),
            T,
            method,
            **options,
        ).grads["gamma"]
        for method, options in REVERSE_VARIANTS
    ]
    for g in grads[1:]:
        assert relative_error(g, grads[0]) < 1e-10


@pytest.mark.parametrize("method", ["implicit-cg", "implicit-neumann", "fixed-point"])
def test_implicit_methods_match_exact_gradient_of_f(ridge, method):
    result = bilevel.hypergradient(
        ridge.inner, ridge.outer, ridge.params(), ridge.hparams(), bilevel.sgd(lr=LR), 2000, method
    )
    value, grad = ridge.exact()
    assert abs(result.value - value) < 1e-9
    assert relative_error(result.grads["gamma"], grad) < 1e-6
    assert result.info["iterations"] >= 1


@pytest.mark.parametrize("method", ["implicit-cg", "implicit-neumann", "fixed-point"])
def test_implicit_methods_with_weight_decay_in_the_dynamics(ridge, method):
    """The optimality condition includes the dynamics' own weight decay (here a hyperparameter):
    the same ridge problem, with its L2 term moved from L into the optimiser."""
    dynamics = bilevel.sgd(lr=LR, weight_decay=lambda h: h["gamma"].exp())

    def plain_inner(p, h):
        r = ridge.X @ p["w"] - ridge.y
        return 0.5 * (r @ r) / len(ridge.y)

    result = bilevel.hypergradient(
        plain_inner, ridge.outer, ridge.params(), ridge.hparams(), dynamics, 2000, method
    )
    assert relative_error(result.grads["gamma"], ridge.exact()[1]) < 1e-6


def test_truncation_is_an_approximation_that_improves_with_k(ridge):
    exact = ridge.exact_T(T, LR)[1]
    errors = [
        relative_error(
            bilevel.hypergradient(
                ridge.inner,
                ridge.outer,
                ridge.params(),
                ridge.hparams(),
                bilevel.sgd(lr=LR),
                T,
                "truncated",
                k=k,
            ).grads["gamma"],
            exact,
        )
        for k in (1, 5, 25)
    ]
    assert errors[0] > errors[1] > errors[2] > 0


def test_f_T_and_its_gradient_converge_to_f_as_T_grows(ridge):
    """The paper's convergence result, shown: |f_T - f| and |grad f_T - grad f| fall with T."""
    value, grad = ridge.exact()
    gaps, grad_gaps = [], []
    for steps in (10, 100, 1000):
        r = bilevel.hypergradient(
            ridge.inner,
            ridge.outer,
            ridge.params(),
            ridge.hparams(),
            bilevel.sgd(lr=0.1),
            steps,
            "reverse",
            memory="trajectory",
        )
        gaps.append(abs(r.value - value))
        grad_gaps.append(float((r.grads["gamma"] - grad).norm()))
    assert gaps[0] > gaps[1] > gaps[2]
    assert grad_gaps[0] > grad_gaps[1] > grad_gaps[2]
    assert gaps[2] < 1e-8 and grad_gaps[2] < 1e-8


def test_solve_node_gives_the_same_hypergradient(ridge):
    gamma = ridge.gamma.detach().clone().requires_grad_(True)
    w = bilevel.solve(ridge.inner, ridge.params(), {"gamma": gamma}, bilevel.sgd(lr=LR), T)
    ridge.outer(w, None).backward()
    assert relative_error(gamma.grad, ridge.exact_T(T, LR)[1]) < 1e-10


def test_memory_policies_store_what_they_promise(ridge):
    """Trajectory stores every state (activations every state and its objective's graph),
    checkpoints about sqrt(T); graph none (one segment)."""
    from bilevel.hypergrad.problem import InnerProblem, with_step
    from bilevel.hypergrad.reverse import reverse

    problem = InnerProblem(with_step(ridge.inner), bilevel.sgd(lr=LR), ("w",))
    lam = {"gamma": ridge.gamma.detach().requires_grad_(True)}
    counts = {
        memory: len(reverse(problem, ridge.params(), lam, T, memory=memory).starts)
        for memory in ("graph", "trajectory", "checkpoint", "activations")
    }
    assert counts == {"graph": 0, "trajectory": T - 1, "checkpoint": 9, "activations": T - 1}


def test_activations_policy_keeps_less_than_the_graph_and_reports_it():
    """memory="activations" keeps each step's forward graph of L (here the logits, n x c) and
    not the graph of its gradient: its reported bytes per step lie between the logits and
    what one step of the kept graph saves (measured the way method="auto" measures it)."""
    import torch.nn.functional as F

    from bilevel.hypergrad.auto import step_graph_bytes
    from bilevel.hypergrad.problem import InnerProblem, with_step

    n, dim, classes, steps = 300, 20, 5, 12
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=generator)

    def inner(p, h):
        losses = F.cross_entropy(X @ p["W"].t(), y, reduction="none")
        return (torch.sigmoid(h["lam"]) * losses).mean()

    def outer(p, h):
        return F.cross_entropy(X @ p["W"].t(), y)

    w0 = {"W": torch.zeros(classes, dim, dtype=torch.float64)}
    lam = {"lam": torch.randn(n, generator=generator, dtype=torch.float64).requires_grad_()}
    result = bilevel.hypergradient(
        inner, outer, w0, lam, bilevel.sgd(lr=0.5), steps, "reverse", memory="activations"
    )
    per_step = result.info["activation_bytes"] / (steps - 1)
    problem = InnerProblem(with_step(inner), bilevel.sgd(lr=0.5), ("W",))
    graph_step, _ = step_graph_bytes(problem, (w0["W"],), lam)
    assert n * classes * 8 <= per_step < graph_step
    graph = bilevel.hypergradient(inner, outer, w0, lam, bilevel.sgd(lr=0.5), steps, "reverse")
    torch.testing.assert_close(result.grads["lam"], graph.grads["lam"], rtol=1e-12, atol=0)
