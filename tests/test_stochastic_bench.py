"""The stochastic benchmark: its learning problems (hypergradients against finite differences in
float64), the libsvm loader (a local HTTP server, malformed files), and `bilevel stochastic` at
a tiny size (its table, plot and json; one-line refusals)."""

from __future__ import annotations

import pytest
import torch

from bilevel import stochastic
from bilevel.stochastic.learning import corrupt_labels

# -- the problems ---------------------------------------------------------------------------


def planted(n: int, d: int, classes: int, seed: int):
    """Features N(0, 1) and labels of a planted linear model (+-1 when classes == 2)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    scores = a @ torch.randn(d, classes, generator=g, dtype=torch.float64)
    labels = (scores + torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(1)
    return a, (2 * labels - 1 if classes == 2 else labels)


def split(a, y, n_train):
    return a[:n_train], y[:n_train], a[n_train:], y[n_train:]


def central_differences(problem, x, coordinates, step=1e-5):
    """d h / d x_k by central differences of the value function (inner problem solved)."""
    basis = torch.eye(len(x), dtype=x.dtype)
    return torch.tensor(
        [
            (problem.value(x + step * basis[k]) - problem.value(x - step * basis[k])) / (2 * step)
            for k in coordinates
        ],
        dtype=torch.float64,
    )


def make_logistic():
    a, y = planted(150, 6, 2, seed=0)
    return stochastic.LogisticRegularisation(*split(a, y, 90), log_weights=-1.0)


def make_softmax():
    a, y = planted(150, 5, 3, seed=1)
    return stochastic.SoftmaxRegularisation(*split(a, y, 90), log_weights=-1.0)


def make_cleaning():
    a, y = planted(120, 4, 3, seed=2)
    return stochastic.DataCleaning(*split(a, y, 80), corruption=0.5, regularisation=0.1, seed=3)


@pytest.mark.parametrize("make", [make_logistic, make_softmax, make_cleaning])
def test_the_hypergradient_at_the_solved_inner_problem_is_the_finite_difference(make):
    problem = make()
    g = torch.Generator().manual_seed(4)
    x = problem.x0 + torch.randn(problem.x0.shape, generator=g, dtype=torch.float64)
    z = problem.inner_solution(x)
    everything = problem.everything(problem.n_inner)
    assert problem.inner_gradient(x, z, everything).abs().max() < 1e-13  # solved
    coordinates = range(len(x)) if len(x) < 10 else [0, 17, 41, 79]
    numeric = central_differences(problem, x, coordinates)
    exact = problem.hypergradient(x)[list(coordinates)]
    torch.testing.assert_close(exact, numeric, rtol=1e-6, atol=1e-9)


def test_evaluations_report_the_value_function_and_the_test_accuracy():
    a, y = planted(200, 6, 2, seed=5)
    problem = stochastic.LogisticRegularisation(
        *split(a[:150], y[:150], 90), test=(a[150:], y[150:])
    )
    solver = stochastic.make(
        "soba", problem, inner_step=0.5, outer_step=0.5, inner_batch=10, outer_batch=10
    )
    solver.run(200)
    metrics = solver.evaluate()
    z_star = problem.inner_solution(solver._x)
    assert metrics["value"] == pytest.approx(problem.value(solver._x), rel=1e-12)
    distance = torch.linalg.vector_norm(solver.z["w"] - z_star)
    assert metrics["inner_error"] == pytest.approx(float(distance), rel=1e-6)
    predicted = torch.where(a[150:] @ solver.z["w"] >= 0, 1, -1)
    assert metrics["test_accuracy"] == float((predicted == y[150:]).double().mean())
    assert 0.6 < metrics["test_accuracy"] <= 1.0  # the planted model is learnt


def test_corruption_replaces_the_stated_fraction_by_wrong_labels_reproducibly():
    labels = torch.arange(100) % 7
    corrupted, mask = corrupt_labels(labels, 0.7, 7, seed=11)
    assert int(mask.sum()) == 70
    assert bool((corrupted[mask] != labels[mask]).all())
    assert torch.equal(corrupted[~mask], labels[~mask])
    again, mask_again = corrupt_labels(labels, 0.7, 7, seed=11)
    assert torch.equal(again, corrupted) and torch.equal(mask, mask_again)
    other, _ = corrupt_labels(labels, 0.7, 7, seed=12)
    assert not torch.equal(other, corrupted)
    # the weights of corrupted and clean examples are reported apart
    problem = make_cleaning()
    x = problem.x0.clone()
    x[problem.corrupted] = -3.0
    metrics = problem.reference_metrics(
        problem.x_layout.unflatten(x), problem.z_layout.unflatten(problem.z0), None
    )
    assert metrics["corrupted_weight"] == pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))
    assert metrics["clean_weight"] == 0.5 and "value" not in metrics


def one_line(caught) -> str:
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_data_is_one_clear_line():
    a, y = planted(40, 3, 3, seed=6)
    with pytest.raises(ValueError) as caught:
        stochastic.LogisticRegularisation(a, y, a, y)
    assert one_line(caught) == "labels must be -1 or +1 (binary classification)"
    with pytest.raises(ValueError) as caught:
        stochastic.SoftmaxRegularisation(a, y, a[:, :2], y)
    assert one_line(caught) == "val_features has 2 features, the training features 3"
    with pytest.raises(ValueError) as caught:
        stochastic.SoftmaxRegularisation(a, y[:-1], a, y)
    assert one_line(caught) == "labels must be a tensor of shape (40,), got (39,)"
    with pytest.raises(ValueError) as caught:
        stochastic.DataCleaning(a, y, a, y, corruption=1.0)
    assert one_line(caught) == "corruption must be a number in [0, 1), got 1.0"
    with pytest.raises(ValueError) as caught:
        stochastic.SoftmaxRegularisation(a, y, a, y, classes=2)
    assert one_line(caught) == "classes=2 but a label is 2"
    with pytest.raises(TypeError) as caught:
        stochastic.SoftmaxRegularisation(a.float(), y, a, y)
    assert "val_features is torch.float64" in one_line(caught)
