"""Projections are checked against slow, obviously-correct float64 references (bisection on the
threshold), against the variational inequality that characterises a Euclidean projection, and for
the contract shared by all of them (new tensor, shape/dtype kept, validated arguments)."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel.constraints import Box, L1Ball, Simplex, project

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- references


def _bisect(g, lo: float, hi: float) -> float:
    """Root of a decreasing function g on [lo, hi] to well below 1e-12."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if g(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * max(1.0, abs(lo)):
            break
    return 0.5 * (lo + hi)


def ref_l1ball(x, radius, bound=None, nonnegative=False):
    x64 = x.detach().double().cpu().reshape(-1)
    y = x64.clamp(min=0) if nonnegative else x64.abs()
    cap = math.inf if bound is None else bound

    def f(tau):
        return float((y - tau).clamp(min=0, max=cap).sum()) - radius

    tau = 0.0 if y.numel() == 0 or f(0.0) <= 0 else _bisect(f, 0.0, float(y.max()))
    z = (y - tau).clamp(min=0, max=cap)
    if not nonnegative:
        z = z * torch.sign(x64)
    return z.reshape(x.shape)


def ref_simplex(x, total=1.0):
    x64 = x.detach().double().cpu().reshape(-1)

    def g(theta):
        return float((x64 - theta).clamp(min=0).sum()) - total

    theta = _bisect(g, float(x64.min()) - total, float(x64.max()))
    return (x64 - theta).clamp(min=0).reshape(x.shape)


# ----------------------------------------------------------------------- feasible points


def feasible_l1(gen, n, radius, bound, nonnegative, count=64):
    """Random points of the set: a box sample shrunk towards 0, plus budget-saturating spikes."""
    scale = bound if bound is not None else radius
    v = torch.rand(count, n, generator=gen, dtype=torch.float64) * scale
    if not nonnegative:
        v = v * torch.where(torch.rand(count, n, generator=gen) < 0.5, -1.0, 1.0).double()
    budget = radius * torch.rand(count, 1, generator=gen, dtype=torch.float64)
    shrink = torch.clamp(budget / v.abs().sum(1, keepdim=True).clamp(min=1e-300), max=1.0)
    points = [v * shrink]
    spike = min(radius, scale)
    eye = torch.eye(n, dtype=torch.float64) * spike
    points += [eye] if nonnegative else [eye, -eye]
    return torch.cat(points)


def feasible_simplex(gen, n, total, count=64):
    e = -torch.log(torch.rand(count, n, generator=gen, dtype=torch.float64))
    return torch.cat(
        [total * e / e.sum(1, keepdim=True), total * torch.eye(n, dtype=torch.float64)]
    )


def assert_projection_inequality(x, p, points):
    """For a projection p of x onto a convex set: <x - p, c - p> <= 0 for every c in the set."""
    x = x.double().reshape(-1)
    p = p.double().reshape(-1)
    inner = (points - p) @ (x - p)
    tol = 1e-9 * (1.0 + float(x.abs().max()) ** 2)
    assert float(inner.max()) <= tol


L1_CONFIGS = [
    (1.0, None, False),
    (3.0, None, True),
    (2.5, 1.0, False),
    (4.0, 1.0, True),  # data hyper-cleaning: weights in [0, 1], sum <= R
    (0.3, 0.05, False),
    (7.0, 0.5, True),
]


# ------------------------------------------------------------------------------- L1Ball


@pytest.mark.parametrize("n", [1, 2, 3, 10, 57, 400])
@pytest.mark.parametrize("radius,bound,nonnegative", L1_CONFIGS)
def test_l1ball_matches_reference_and_is_optimal(n, radius, bound, nonnegative):
    gen = torch.Generator().manual_seed(1000 * n + int(10 * radius))
    proj = L1Ball(radius, bound=bound, nonnegative=nonnegative)
    points = feasible_l1(gen, n, radius, bound, nonnegative)
    for scale in (0.05, 1.0, 10.0):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        p = proj(x)
        torch.testing.assert_close(p, ref_l1ball(x, radius, bound, nonnegative), atol=1e-10, rtol=0)
        assert float(p.abs().sum()) <= radius * (1 + 1e-12)
        if bound is not None:
            assert float(p.abs().max()) <= bound
        if nonnegative:
            assert float(p.min()) >= 0.0
        assert_projection_inequality(x, p, points)
        torch.testing.assert_close(proj(p), p, atol=1e-12, rtol=0)


def test_l1ball_budget_is_met_exactly_when_active():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1000, generator=gen, dtype=torch.float64) * 2
    p = L1Ball(100.0, bound=1.0, nonnegative=True)(x)
    assert abs(float(p.sum()) - 100.0) < 1e-10


def test_l1ball_already_feasible_returns_equal_new_tensor():
    x = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64)
    before = x.clone()
    p = L1Ball(1.0, bound=0.5)(x)
    torch.testing.assert_close(p, x, atol=0, rtol=0)
    assert p.data_ptr() != x.data_ptr()
    p.add_(1.0)
    torch.testing.assert_close(x, before, atol=0, rtol=0)


def test_l1ball_does_not_modify_input_when_active():
    x = torch.tensor([[3.0, -2.0], [0.5, 4.0]])
    before = x.clone()
    L1Ball(1.0)(x)
    L1Ball(1.0, bound=0.3, nonnegative=True)(x)
    torch.testing.assert_close(x, before, atol=0, rtol=0)


def test_l1ball_all_negative_nonnegative_gives_zeros():
    x = -torch.rand(20, dtype=torch.float64) - 0.1
    p = L1Ball(1.0, bound=1.0, nonnegative=True)(x)
    assert torch.equal(p, torch.zeros_like(x))


@pytest.mark.parametrize("nonnegative", [False, True])
def test_l1ball_box_decides_when_bound_times_n_below_radius(nonnegative):
    x = torch.tensor([3.0, -0.2, 0.7, -5.0, 1.5], dtype=torch.float64)
    p = L1Ball(10.0, bound=1.0, nonnegative=nonnegative)(x)
    expected = x.clamp(0.0, 1.0) if nonnegative else x.clamp(-1.0, 1.0)
    torch.testing.assert_close(p, expected, atol=0, rtol=0)


def test_l1ball_bound_times_n_equal_radius_is_box():
    x = torch.full((4,), 2.0, dtype=torch.float64)
    p = L1Ball(4.0, bound=1.0, nonnegative=True)(x)
    torch.testing.assert_close(p, torch.ones(4, dtype=torch.float64), atol=0, rtol=0)


@pytest.mark.parametrize(
    "values,radius,bound,nonnegative",
    [
        ([0.7] * 10, 3.0, 1.0, True),  # all tied: each shrinks by the same amount
        ([2.0, 2.0, 2.0, 0.5, 0.5], 2.5, 1.0, True),  # ties above the bound
        ([1.5, 0.5, 0.5, -1.5], 2.0, 1.0, False),  # y_i - bound coincides with y_j
        ([1.0, 1.0, -1.0, -1.0], 2.0, None, False),
        ([3.0, 3.0, 3.0], 1.0, 0.5, False),
        ([0.0, 0.0, 5.0], 1.0, None, False),
    ],
)
def test_l1ball_ties(values, radius, bound, nonnegative):
    x = torch.tensor(values, dtype=torch.float64)
    p = L1Ball(radius, bound=bound, nonnegative=nonnegative)(x)
    torch.testing.assert_close(p, ref_l1ball(x, radius, bound, nonnegative), atol=1e-12, rtol=0)


def test_l1ball_ties_exact_value():
    p = L1Ball(3.0, bound=1.0, nonnegative=True)(torch.full((10,), 0.7, dtype=torch.float64))
    torch.testing.assert_close(p, torch.full((10,), 0.3, dtype=torch.float64))


@pytest.mark.parametrize(
    "value,proj,expected",
    [
        (5.0, L1Ball(2.0), 2.0),
        (-5.0, L1Ball(2.0), -2.0),
        (-5.0, L1Ball(2.0, nonnegative=True), 0.0),
        (5.0, L1Ball(2.0, bound=1.0), 1.0),
        (5.0, L1Ball(0.5, bound=1.0), 0.5),
        (0.25, L1Ball(0.5, bound=1.0), 0.25),
    ],
)
def test_l1ball_single_element(value, proj, expected):
    p = proj(torch.tensor([value], dtype=torch.float64))
    assert p.shape == (1,)
    assert float(p) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("radius,bound,nonnegative", L1_CONFIGS)
def test_l1ball_float32_keeps_dtype_and_agrees(radius, bound, nonnegative):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(300, generator=gen) * 0.2
    p = L1Ball(radius, bound=bound, nonnegative=nonnegative)(x)
    assert p.dtype == torch.float32
    torch.testing.assert_close(
        p.double(), ref_l1ball(x, radius, bound, nonnegative), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes_are_kept(dtype):
    x = torch.linspace(-2, 2, 9).to(dtype)
    for proj in (L1Ball(1.0, bound=0.5), Simplex(), Box(-1.0, 1.0)):
        assert proj(x).dtype == dtype


def test_l1ball_2d_shape_is_preserved_and_treated_as_flat():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    proj = L1Ball(2.0, bound=0.4)
    p = proj(x)
    assert p.shape == (4, 5)
    torch.testing.assert_close(p, proj(x.reshape(-1)).reshape(4, 5), atol=0, rtol=0)
    torch.testing.assert_close(p, ref_l1ball(x, 2.0, 0.4), atol=1e-10, rtol=0)


def test_l1ball_empty_and_scalar_tensors():
    empty = torch.empty(0, 3)
    assert L1Ball(1.0)(empty).shape == (0, 3)
    assert float(L1Ball(1.0)(torch.tensor(4.0))) == pytest.approx(1.0)


def test_l1ball_large_hyper_cleaning_case_is_fast_and_correct():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(20000, generator=gen, dtype=torch.float64) + 0.5
    p = L1Ball(5000.0, bound=1.0, nonnegative=True)(x)
    torch.testing.assert_close(p, ref_l1ball(x, 5000.0, 1.0, True), atol=1e-9, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_device_is_kept(device):
    x = torch.randn(50, device=device)
    for proj in (L1Ball(1.0, bound=0.1, nonnegative=True), Simplex(2.0), Box(0.0, 1.0)):
        p = proj(x)
        assert p.device == x.device
        assert p.dtype == x.dtype


# ------------------------------------------------------------------------------ Simplex


@pytest.mark.parametrize("n", [1, 2, 5, 33, 500])
@pytest.mark.parametrize("total", [1.0, 0.2, 7.5])
def test_simplex_matches_reference_and_is_optimal(n, total):
    gen = torch.Generator().manual_seed(n + int(10 * total))
    proj = Simplex(total)
    points = feasible_simplex(gen, n, total)
    for scale in (0.01, 1.0, 20.0):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        p = proj(x)
        torch.testing.assert_close(p, ref_simplex(x, total), atol=1e-10, rtol=0)
        assert float(p.min()) >= 0.0
        assert abs(float(p.sum()) - total) <= 1e-10 * max(1.0, total)
        assert_projection_inequality(x, p, points)
        torch.testing.assert_close(proj(p), p, atol=1e-12, rtol=0)


def test_simplex_edge_cases():
    assert torch.equal(Simplex(3.0)(torch.tensor([-9.0])), torch.tensor([3.0]))
    ties = Simplex()(torch.full((4,), -2.0, dtype=torch.float64))
    torch.testing.assert_close(ties, torch.full((4,), 0.25, dtype=torch.float64))
    inside = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    p = Simplex()(inside)
    assert p.shape == (2, 2) and p.data_ptr() != inside.data_ptr()
    torch.testing.assert_close(p, inside, atol=1e-15, rtol=0)
    x32 = torch.randn(100)
    p32 = Simplex()(x32)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), ref_simplex(x32), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="empty"):
        Simplex()(torch.empty(0))


# ---------------------------------------------------------------------------------- Box


def test_box_clamps_and_returns_new_tensor():
    x = torch.tensor([[-2.0, 0.5], [3.0, 1.0]])
    before = x.clone()
    p = Box(0.0, 1.0)(x)
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.5], [1.0, 1.0]]), atol=0, rtol=0)
    torch.testing.assert_close(x, before, atol=0, rtol=0)
    q = Box(-math.inf, math.inf)(x)
    assert torch.equal(q, x) and q.data_ptr() != x.data_ptr()
    assert torch.equal(Box(0, math.inf)(x), x.clamp(min=0))
    assert torch.equal(Box(2.0, 2.0)(x), torch.full_like(x, 2.0))


def test_box_is_optimal_and_idempotent():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, generator=gen, dtype=torch.float64) * 3
    proj = Box(-0.5, 1.5)
    p = proj(x)
    points = torch.rand(64, 40, generator=gen, dtype=torch.float64) * 2 - 0.5
    assert_projection_inequality(x, p, points)
    assert torch.equal(proj(p), p)


# --------------------------------------------------------------------- validation, repr


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: L1Ball(-1.0), r"radius must be > 0 and finite, got -1\.0"),
        (lambda: L1Ball(0), r"radius must be > 0 and finite, got 0\.0"),
        (lambda: L1Ball(math.inf), r"radius must be > 0 and finite, got inf"),
        (lambda: L1Ball(math.nan), r"radius must not be NaN"),
        (lambda: L1Ball("1"), r"radius must be a real number, got '1'"),
        (lambda: L1Ball(True), r"radius must be a real number, got True"),
        (lambda: L1Ball(1.0, bound=0.0), r"bound must be > 0 and finite, got 0\.0"),
        (lambda: L1Ball(1.0, bound=-2), r"bound must be > 0 and finite, got -2\.0"),
        (lambda: L1Ball(1.0, nonnegative=1), r"nonnegative must be a bool, got 1"),
        (lambda: Simplex(0.0), r"total must be > 0 and finite, got 0\.0"),
        (lambda: Simplex(-3), r"total must be > 0 and finite, got -3\.0"),
        (lambda: Box(1.0, 0.0), r"low must be <= high, got low=1\.0, high=0\.0"),
        (lambda: Box(math.nan, 1.0), r"low must not be NaN"),
        (lambda: Box(0.0, None), r"high must be a real number, got None"),
    ],
)
def test_invalid_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_non_float_tensors_are_rejected():
    for proj in (Box(0, 1), L1Ball(1.0), Simplex()):
        with pytest.raises(TypeError, match="floating-point"):
            proj(torch.tensor([1, 2, 3]))


def test_repr_and_immutability():
    assert repr(L1Ball(5, bound=1, nonnegative=True)) == (
        "L1Ball(radius=5.0, bound=1.0, nonnegative=True)"
    )
    assert repr(Simplex()) == "Simplex(total=1.0)"
    assert repr(Box(0, 1)) == "Box(low=0.0, high=1.0)"
    assert L1Ball(2.0) == L1Ball(2)
    with pytest.raises(AttributeError):
        L1Ball(1.0).radius = 2.0  # type: ignore[misc]


# ------------------------------------------------------------------------------ project


def test_project_applies_in_place_to_leaves_requiring_grad():
    weights = torch.tensor([0.9, 1.7, -0.4, 0.6], requires_grad=True)
    log_lr = torch.tensor(3.0, requires_grad=True)
    untouched = torch.tensor([5.0])
    hparams = {"weights": weights, "log_lr": log_lr, "other": untouched}
    project(hparams, {"weights": L1Ball(1.5, bound=1.0, nonnegative=True), "log_lr": Box(-5, 0)})
    assert hparams["weights"] is weights and weights.requires_grad and weights.grad_fn is None
    expected = ref_l1ball(torch.tensor([0.9, 1.7, -0.4, 0.6]), 1.5, 1.0, True).float()
    torch.testing.assert_close(weights.detach(), expected, atol=1e-6, rtol=0)
    assert float(log_lr.detach()) == 0.0
    assert float(untouched) == 5.0


def test_project_rejects_unknown_key_before_modifying_anything():
    a = torch.tensor([2.0, 2.0])
    with pytest.raises(KeyError, match="'typo'"):
        project({"a": a}, {"a": Box(0, 1), "typo": Box(0, 1)})
    assert torch.equal(a, torch.tensor([2.0, 2.0]))


def test_project_rejects_bad_constraints():
    a = torch.ones(3)
    with pytest.raises(ValueError, match="'a' must be callable"):
        project({"a": a}, {"a": 3})
    with pytest.raises(ValueError, match="'a' changed the shape"):
        project({"a": a}, {"a": lambda t: t.sum()})
