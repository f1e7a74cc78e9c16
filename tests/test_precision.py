"""Mixed precision (bilevel.Precision): every method under bfloat16 and float16 autocast
against the same method in float64, replays identical to the kept graph, overflow never silent.

The float64 references are the methods' own results on the same MLP (tests.problems.SmallMLP,
plain gradient descent), which test_nonconvex.py checks against central finite differences.
Relative errors of the hypergradient, torch 2.13 CPU, measured by
`PYTHONPATH=src python benchmarks/precision_error.py`:

    T = 30 (CASES)                 float32   bf16     fp16
    reverse (each memory policy)   1e-7      2.8e-3   1.1e-3
    truncated k=10                 1e-7      3.8e-3   1.0e-3
    forward                        2e-7      7.0e-4   6.7e-4
    implicit-cg                    4e-6      2.6e-3   1.9e-3
    auto (chooses reverse here)    1e-7      2.8e-3   1.1e-3

    near the minimum (IMPLICIT: T = 300, 4x the learning rate)
    implicit-cg                    5e-6      8.1e-2   4.1e-2
    implicit-neumann               7e-6      8.6e-2   3.9e-2
    fixed-point                    5e-6      1.0e-1   4.3e-2

Near the minimum the lowered run stalls where its rounded gradient vanishes, and an implicit
estimate amplifies that error of w_T by the inverse Hessian: the implicit system itself, formed
in float32, adds nothing (test_implicit_error_is_the_lowered_runs_w_T).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import bilevel
from bilevel.hypergrad.problem import leaves

from .problems import SmallMLP, relative_error

BF16_TOLERANCE = 1e-2  # bfloat16 keeps 8 significant bits: each rounding is up to 2**-9
FP16_TOLERANCE = 4e-3  # float16 keeps 11

STEPS = 30  # the MLP is still far from its minimum: the unrolled methods' setting
CASES = [
    ("reverse", {"memory": "graph"}),
    ("reverse", {"memory": "trajectory"}),
    ("reverse", {"memory": "checkpoint"}),
    ("truncated", {"k": 10}),
    ("forward", {}),
    ("implicit-cg", {"iterations": 200, "tolerance": 1e-7}),
    ("auto", {}),  # chooses among the above, measuring steps under the precision
]
NEAR_MINIMUM = {"steps": 300, "faster": 4.0}  # where the implicit estimates mean something
IMPLICIT = [
    ("implicit-cg", {"iterations": 200, "tolerance": 1e-7}),
    ("implicit-neumann", {"iterations": 300, "tolerance": 1e-4}),
    ("fixed-point", {"iterations": 300, "tolerance": 1e-4}),
]


def mlp_in(dtype: torch.dtype, device: str = "cpu") -> SmallMLP:
    """tests.problems.SmallMLP with its data and w_0 in `dtype` on `device`."""
    mlp = SmallMLP()
    data = (mlp.x, mlp.y, mlp.xv, mlp.yv)
    mlp.x, mlp.y, mlp.xv, mlp.yv = (v.to(device, dtype) for v in data)
    mlp.w0 = {k: v.to(device, dtype) for k, v in mlp.w0.items()}
    return mlp


def run(
    method, options, dtype=torch.float32, precision=None, steps=STEPS, faster=1.0, device="cpu"
):
    """bilevel.hypergradient on the MLP in `dtype` on `device` under `precision`: plain
    gradient descent, its learning rate `faster` times the MLP's."""
    mlp = mlp_in(dtype, device)
    hparams = {
        k: v.detach().to(device, dtype).requires_grad_(True) for k, v in mlp.hparams().items()
    }
    dynamics = bilevel.sgd(lr=lambda h: h["log_lr"].exp() * faster, weight_decay=mlp.weight_decay)
    return bilevel.hypergradient(
        mlp.inner, mlp.outer, mlp.w0, hparams, dynamics, steps, method,
        precision=precision, **options,
    )  # fmt: skip


def flat(result) -> torch.Tensor:
    return torch.cat([g.reshape(-1).double() for g in result.grads.values()])


@functools.cache
def reference(method: str, options: tuple, **setting) -> torch.Tensor:
    return flat(run(method, dict(options), torch.float64, **setting))


def error(method, options, precision, **setting) -> float:
    """Relative error of the hypergradient under `precision` against float64; `setting`:
    steps, faster and device, as `run` takes them."""
    lowered = flat(run(method, options, precision=precision, **setting)).cpu()
    return relative_error(lowered, reference(method, tuple(options.items()), **setting).cpu())


# -- accuracy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize(
    "precision,tolerance",
    [("bf16", BF16_TOLERANCE), (bilevel.Precision(torch.float16), FP16_TOLERANCE)],
)
def test_every_method_under_autocast_is_close_to_float64(method, options, precision, tolerance):
    assert error(method, options, precision) < tolerance


@pytest.mark.filterwarnings("ignore::bilevel.SolverWarning")  # a lowered w_T is less stationary
@pytest.mark.parametrize("method,options", IMPLICIT)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_implicit_methods_near_the_minimum(method, options, precision):
    """The measured 4e-2 (fp16) to 1e-1 (bf16): bounded, and what the docs state."""
    assert error(method, options, precision, **NEAR_MINIMUM) < 0.2


def test_implicit_error_is_the_lowered_runs_w_T():
    """implicit-cg under bf16 equals float64 implicit-cg at the same w_T (one step of a
    negligible learning rate from it): its system (d^2 L/dw^2, d^2 L/dw dlambda) is formed in
    float32, so the lowered precision costs no more than the inner run's own rounding."""
    method, options = IMPLICIT[0]
    lowered = run(method, options, precision="bf16", **NEAR_MINIMUM)
    mlp = mlp_in(torch.float64)
    w_T = {k: v.double() for k, v in lowered.params.items()}
    still = bilevel.sgd(lr=lambda h: 1e-12 * h["log_lr"].exp(), weight_decay=mlp.weight_decay)
    at_w_T = bilevel.hypergradient(
        mlp.inner, mlp.outer, w_T, mlp.hparams(), still, 1, method, **options
    )
    assert relative_error(flat(lowered), flat(at_w_T)) < 1e-5
    assert error(method, options, "bf16", **NEAR_MINIMUM) > 1e-2  # while w_T is off by more


def test_autocast_changes_the_result():
    """The comparison above is not vacuous: autocast does lower the inner objective."""
    assert error("reverse", {}, "bf16") > 1e-5
    assert error("reverse", {}, None) < 1e-5


def test_state_tangents_and_hypergradient_stay_float32():
    lowered = [run("reverse", {}, precision="bf16"), run("forward", {}, precision="fp16")]
    for result in lowered:
        tensors = [*result.grads.values(), *result.params.values()]
        assert all(v.dtype == torch.float32 for v in tensors)
    solver = bilevel.hypergrad.ForwardSolver(*_inner_problem("adam", "bf16"), vectorize=True)
    solver.advance(3)
    assert all(v.dtype == torch.float32 for v in (*solver.z, *solver.tangents))


def _inner_problem(kind, precision, steps=3):
    mlp = mlp_in(torch.float32)
    hparams = {k: v.detach().float().requires_grad_(True) for k, v in mlp.hparams().items()}
    problem = bilevel.Problem.create(
        mlp.inner, mlp.outer, mlp.w0, hparams, mlp.dynamics(kind), steps, precision=precision
    )
    return problem.inner, mlp.w0, hparams


# -- replays -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_replayed_steps_are_the_steps_that_ran(kind, precision):
    """Reverse mode stores states from steps without a graph and replays them with one: under
    autocast both must round alike, or the pull-back differentiates another trajectory."""
    problem, w0, hparams = _inner_problem(kind, precision)
    z = problem.start(w0, hparams)
    without_graph = problem.run(z, hparams, 1, 10)
    with_graph = problem.run(leaves(z), hparams, 1, 10, graph=True)
    assert all(torch.equal(a, b.detach()) for a, b in zip(without_graph, with_graph))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_memory_policies_agree_under_autocast(precision):
    """trajectory and activations are bitwise the kept graph; checkpoint sums the
    hypergradient over segments in another order, so it agrees to float32 rounding (as
    without autocast), a thousand times closer than autocast's own error."""
    graph, trajectory, checkpoint, activations = (
        run("reverse", {"memory": memory}, precision=precision)
        for memory in ("graph", "trajectory", "checkpoint", "activations")
    )
    for key in graph.grads:
        assert torch.equal(graph.grads[key], trajectory.grads[key])
        assert torch.equal(graph.grads[key], activations.grads[key])
    for key in graph.params:
        assert torch.equal(graph.params[key], checkpoint.params[key])
    assert relative_error(flat(graph), flat(checkpoint)) < 1e-6


# -- the other entry points --------------------------------------------------------------------


def test_solve_check_and_outer_loops_take_precision():
    mlp = mlp_in(torch.float32)
    hparams = {k: v.detach().float().requires_grad_(True) for k, v in mlp.hparams().items()}
    dynamics = mlp.dynamics("sgd")
    expected = run("reverse", {}, precision="bf16")

    w_T = bilevel.solve(mlp.inner, mlp.w0, hparams, dynamics, STEPS, precision="bf16")
    mlp.outer(w_T, hparams).backward()
    for key, tensor in hparams.items():
        assert torch.allclose(tensor.grad, expected.grads[key], rtol=1e-6, atol=1e-9)

    report = bilevel.check(mlp.inner, mlp.outer, mlp.w0, hparams, dynamics, STEPS, precision="bf16")
    # finite differences of f_T in float32: the report holds bf16's error (2.7e-3 measured)
    assert report.relative_error < BF16_TOLERANCE, str(report)

    for loop in (
        bilevel.HyperOptimizer(
            mlp.inner, mlp.outer, mlp.w0, hparams, dynamics, STEPS,
            torch.optim.SGD(hparams.values(), lr=0.1), precision="bf16",
        ),
        bilevel.RealTimeHyperOptimizer(
            mlp.inner, mlp.outer, mlp.w0, hparams, dynamics, 10,
            torch.optim.SGD(hparams.values(), lr=0.1), precision="fp16",
        ),
    ):  # fmt: skip
        inner = loop.problem.inner if hasattr(loop, "problem") else loop.solver.problem
        assert inner.precision is not None
        metrics = loop.run(2)
        assert all(math.isfinite(m["hypergradient_norm"]) for m in metrics)


# -- overflow ----------------------------------------------------------------------------------


def _linear(scale: float, steps: int = 5, device: str = "cpu", dtype=torch.float32):
    """A least-squares problem whose gradient is about `scale` times larger than its data."""
    g = torch.Generator().manual_seed(0)
    x, y = (
        v.to(device, dtype) for v in (torch.randn(32, 4, generator=g), torch.randn(32, generator=g))
    )

    def inner(p, h):
        return scale * ((x @ p["w"] - y) ** 2).mean() + (h["l2"].exp() * p["w"] ** 2).sum()

    def outer(p, h):
        return ((x @ p["w"] - y) ** 2).mean()

    params = {"w": torch.zeros(4, device=device, dtype=dtype)}
    hparams = {"l2": torch.zeros(4, device=device, dtype=dtype, requires_grad=True)}
    return inner, outer, params, hparams, bilevel.sgd(lr=1e-3 / scale), steps


OVERFLOWING = [("reverse", {}), ("forward", {}), ("implicit-cg", {"tolerance": 1e-5})]


@pytest.mark.parametrize("method,options", OVERFLOWING)
def test_float16_gradient_overflow_names_the_precision(method, options):
    """scale 1e3 times loss_scale 1024 puts the gradient past float16's 65504: an error that
    says so, not a skipped step. The same problem runs in float32, bf16, and fp16 with a
    smaller loss scale."""
    problem = _linear(1e3)
    with pytest.raises(bilevel.InnerDivergenceError, match=r"precision fp16.*loss_scale") as info:
        bilevel.hypergradient(*problem, method, precision="fp16", **options)
    message = str(info.value)
    assert "overflowed at step 1" in message and "precision='bf16'" in message
    for precision in (None, "bf16", bilevel.Precision(torch.float16, loss_scale=1.0)):
        result = bilevel.hypergradient(*problem, method, precision=precision, **options)
        assert torch.isfinite(result.grads["l2"]).all()


def test_float16_activation_overflow_names_the_precision():
    """An activation past 65504 in the forward pass: no loss scale helps, bf16 does."""
    inner, outer, params, hparams, _, steps = _linear(1.0)
    big = 300.0 * torch.ones(4, 4)

    def wide(p, h):  # (x @ big) reaches ~1e3 x |x|, its square past float16's range
        return ((torch.ones(8, 4) @ (big * (1 + p["w"]))) ** 2).mean() * 1e-12 + inner(p, h)

    dynamics = bilevel.sgd(lr=1e-3)
    with pytest.raises(bilevel.InnerDivergenceError, match=r"inner objective overflowed"):
        bilevel.hypergradient(wide, outer, params, hparams, dynamics, steps, precision="fp16")
    result = bilevel.hypergradient(wide, outer, params, hparams, dynamics, steps, precision="bf16")
    assert torch.isfinite(result.grads["l2"]).all()


def test_an_overflow_that_the_dynamics_would_hide_is_still_caught():
    """A dynamics that sanitises its gradient (nan_to_num, then a clamp) turns an overflowed one
    into a finite step: the run's state stays finite, and only the flag on the step's loss
    reveals the overflow."""
    inner, outer, params, hparams, _, steps = _linear(1e3)

    def clipped_step(params, state, grads, hparams, t):
        return {k: params[k] - 1e-6 * grads[k].nan_to_num().clamp(-1.0, 1.0) for k in params}, state

    clipped = bilevel.Dynamics("clipped", init=lambda params: (), step=clipped_step, lr=1e-6)
    with pytest.raises(bilevel.InnerDivergenceError, match=r"precision fp16"):
        bilevel.hypergradient(inner, outer, params, hparams, clipped, steps, precision="fp16")


def test_float16_overflow_in_the_pull_back_names_the_precision():
    """The run is finite but an adjoint of 1e12 overflows float16 in the double backward."""
    inner, _, params, hparams, dynamics, steps = _linear(1.0)

    def outer(p, h):
        return 1e12 * p["w"].sum()

    with pytest.raises(bilevel.HypergradientError, match=r"precision fp16.*bf16"):
        bilevel.hypergradient(inner, outer, params, hparams, dynamics, steps, precision="fp16")
    w_T = bilevel.solve(inner, params, hparams, dynamics, steps, precision="fp16")
    with pytest.raises(bilevel.HypergradientError, match=r"precision fp16"):
        outer(w_T, hparams).backward()
    result = bilevel.hypergradient(inner, outer, params, hparams, dynamics, steps)
    assert torch.isfinite(result.grads["l2"]).all()


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,expected",
    [
        (None, None),
        ("fp32", None),
        (torch.float32, None),
        ("bf16", bilevel.Precision(torch.bfloat16, 1.0)),
        ("BFloat16", bilevel.Precision(torch.bfloat16, 1.0)),
        (torch.float16, bilevel.Precision(torch.float16, 1024.0)),
        ("half", bilevel.Precision(torch.float16, 1024.0)),
    ],
)
def test_precision_spellings(given, expected):
    problem, _, _ = _inner_problem("sgd", given)
    assert problem.precision == expected


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: bilevel.Precision(torch.float64), "dtype must be torch.bfloat16 or"),
        (lambda: bilevel.Precision(torch.float16, loss_scale=1000.0), "power of two"),
        (lambda: bilevel.Precision(torch.float16, loss_scale=0.0), "power of two"),
        (lambda: bilevel.Precision(torch.float16, loss_scale=math.inf), "power of two"),
        (lambda: _inner_problem("sgd", "int8"), "precision must be None, 'fp32'"),
        (lambda: _inner_problem("sgd", 16), "precision must be None, 'fp32'"),
    ],
)
def test_bad_precision_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_precision_needs_float32_tensors():
    mlp = mlp_in(torch.float64)
    with pytest.raises(TypeError, match=r"precision='bf16' needs float32 params.*\.float\(\)"):
        bilevel.hypergradient(
            mlp.inner, mlp.outer, mlp.w0, mlp.hparams(), mlp.dynamics("sgd"), 3,
            precision="bf16",
        )  # fmt: skip


# -- CUDA (run where a GPU is present) ---------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize(
    "precision,tolerance", [("bf16", BF16_TOLERANCE), ("fp16", FP16_TOLERANCE)]
)
def test_cuda_autocast_is_close_to_float64(method, options, precision, tolerance):
    assert 1e-5 < error(method, options, precision, device="cuda") < tolerance


@cuda
@pytest.mark.parametrize("method,options", OVERFLOWING)
def test_cuda_float16_overflow_names_the_precision(method, options):
    with pytest.raises(bilevel.InnerDivergenceError, match=r"precision fp16.*loss_scale"):
        bilevel.hypergradient(*_linear(1e3, device="cuda"), method, precision="fp16", **options)


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_trajectory_replays_equal_the_kept_graph(precision):
    graph, trajectory = (
        run("reverse", {"memory": memory}, precision=precision, device="cuda")
        for memory in ("graph", "trajectory")
    )
    for key in graph.grads:
        assert torch.equal(graph.grads[key], trajectory.grads[key])
