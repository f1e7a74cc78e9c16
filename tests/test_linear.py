"""The linear solvers against torch.linalg on small dense systems, in float64.

Each system is a dense matrix applied to a tuple of tensors (flattened, multiplied, split
back), so the solvers see the same operator form as the implicit methods.
"""

import pytest
import torch

from bilevel.hypergrad import linear
from bilevel.hypergrad.linear import SOLVERS

DTYPE = torch.float64
ITERATIVE = ["cg", "gmres", "bicgstab", "normal-cg"]
GENERAL = ["gmres", "bicgstab", "normal-cg", "dense"]  # need no symmetry
SHAPES = {"vector": [(7,)], "tuple": [(3, 2), ()]}  # the tuple: a matrix and a 0-dim tensor


class Operator:
    """v -> M v and v -> M^T v over tuples of tensors of the given shapes, counting products."""

    def __init__(self, matrix, shapes):
        self.matrix, self.shapes, self.products = matrix, shapes, 0

    def matvec(self, v):
        return self._apply(self.matrix, v)

    def rmatvec(self, v):
        return self._apply(self.matrix.T, v)

    def _apply(self, matrix, v):
        self.products += 1
        return self.split(matrix @ flat(v))

    def split(self, flat):
        sizes = [torch.Size(s).numel() for s in self.shapes]
        return tuple(p.reshape(s) for p, s in zip(torch.split(flat, sizes), self.shapes))

    def true_residual(self, x, b):
        return float(
            torch.linalg.norm(flat(b) - self.matrix @ flat(x)) / torch.linalg.norm(flat(b))
        )


def flat(v):
    return torch.cat([t.reshape(-1) for t in v])


def size(shapes):
    return sum(torch.Size(s).numel() for s in shapes)


def spd(n, seed, exponent=2.0):
    """Q diag(1 .. 10^exponent) Q^T: symmetric positive definite, condition 10^exponent."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=DTYPE))
    return q @ torch.diag(torch.logspace(0, exponent, n, dtype=DTYPE)) @ q.T


def nonsymmetric(n, seed):
    """I + a random matrix of spectral norm about 0.6: well conditioned, far from symmetric."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.eye(n, dtype=DTYPE)
        + 0.3 * torch.randn(n, n, generator=generator, dtype=DTYPE) / n**0.5
    )


def rhs(operator, seed):
    generator = torch.Generator().manual_seed(seed)
    return operator.split(torch.randn(operator.matrix.shape[0], generator=generator, dtype=DTYPE))


def solve(name, operator, b, iterations=100, tolerance=1e-12, **options):
    return SOLVERS[name](
        operator.matvec, b, iterations=iterations, tolerance=tolerance,
        rmatvec=operator.rmatvec, **options,
    )  # fmt: skip


def assert_solves(operator, x, b, info):
    expected = operator.split(torch.linalg.solve(operator.matrix, flat(b)))
    for got, want in zip(x, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert info["converged"] is True
    assert info["residual"] == pytest.approx(operator.true_residual(x, b), rel=1e-6, abs=1e-16)


MATRICES = {"spd": lambda n: spd(n, seed=0), "nonsymmetric": lambda n: nonsymmetric(n, seed=2)}
CASES = [(name, "spd") for name in SOLVERS] + [(name, "nonsymmetric") for name in GENERAL]


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(("name", "matrix"), CASES)
def test_every_solver_solves_its_systems_through_one_signature(name, matrix, shapes):
    """All solvers on a positive definite system, those for general A on a non-symmetric one."""
    operator = Operator(MATRICES[matrix](size(shapes)), shapes)
    b = rhs(operator, seed=1)
    x, info = solve(name, operator, b)
    assert_solves(operator, x, b, info)


def test_restarted_gmres_solves_a_nonsymmetric_system_over_several_cycles():
    operator = Operator(nonsymmetric(30, seed=4), [(30,)])
    b = rhs(operator, seed=5)
    x, info = solve("gmres", operator, b, restart=3)
    assert_solves(operator, x, b, info)
    assert info["iterations"] > 3  # more than one cycle


def test_full_gmres_is_exact_in_n_steps_where_restarted_gmres_stagnates():
    """The cyclic shift with b = e_1: the residual of GMRES stays ||b|| for n - 1 steps and is
    0 at step n. A restart before n gains nothing, so a second cycle is not attempted."""
    n = 8
    operator = Operator(torch.eye(n, dtype=DTYPE).roll(1, dims=0), [(n,)])
    b = (torch.eye(n, dtype=DTYPE)[0],)
    x, info = solve("gmres", operator, b, iterations=n, restart=None)
    assert_solves(operator, x, b, info)
    assert info["iterations"] == n
    x, info = solve("gmres", operator, b, iterations=100, restart=n - 1)
    assert info["iterations"] == n - 1 and info["converged"] is False
    assert info["residual"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["cg", "gmres", "normal-cg"])
def test_krylov_solvers_finish_in_as_many_steps_as_distinct_eigenvalues(name):
    """A symmetric A with 3 distinct eigenvalues (each 5 times): its Krylov spaces stop
    growing after 3 steps, so CG, GMRES and CGNR (A^T A has 3 too) are exact in 3."""
    q, _ = torch.linalg.qr(
        torch.randn(15, 15, dtype=DTYPE, generator=torch.Generator().manual_seed(8))
    )
    eigenvalues = torch.tensor([1.0, 2.0, 5.0], dtype=DTYPE).repeat(5)
    operator = Operator(q @ torch.diag(eigenvalues) @ q.T, [(15,)])
    b = rhs(operator, seed=9)
    x, info = solve(name, operator, b)
    assert_solves(operator, x, b, info)
    assert info["iterations"] == 3


def test_dense_makes_one_product_per_unknown():
    operator = Operator(nonsymmetric(7, seed=10), SHAPES["tuple"])
    b = rhs(operator, seed=11)
    x, info = solve("dense", operator, b)
    assert_solves(operator, x, b, info)
    assert info["iterations"] == operator.products == 7


@pytest.mark.parametrize("name", ITERATIVE)
def test_too_few_iterations_report_not_converged_with_the_true_residual(name):
    operator = Operator(spd(20, seed=10, exponent=3.0), [(4, 5)])
    b = rhs(operator, seed=11)
    x, info = solve(name, operator, b, iterations=2, tolerance=1e-10)
    assert info["iterations"] == 2 and info["converged"] is False
    assert info["residual"] == pytest.approx(operator.true_residual(x, b), rel=1e-9)
    assert info["residual"] > 1e-6


def test_cg_reports_the_true_residual_where_its_recurrence_drifts():
    """On a system of condition 1e10 the recurrence residual of CG falls to 1e-17 while the
    true one stays near 1e-7: the info must give the true one, and not claim convergence."""
    operator = Operator(spd(12, seed=0, exponent=10.0), [(12,)])
    b = rhs(operator, seed=12)
    x, info = linear.conjugate_gradient(operator.matvec, b, iterations=200, tolerance=1e-14)
    true = operator.true_residual(x, b)
    assert info["residual"] == pytest.approx(true, rel=1e-9)
    assert true > 1e-10 and info["converged"] is False


def test_cg_restarts_from_the_true_residual_where_its_recurrence_drifts():
    """Condition 1e8: the recurrence of one CG run meets 1e-9 while the true residual is
    1.7e-9; a restart from the true residual brings it under the tolerance itself."""
    operator = Operator(spd(12, seed=0, exponent=8.0), [(12,)])
    b = rhs(operator, seed=12)
    x, info = linear.conjugate_gradient(operator.matvec, b, iterations=300, tolerance=1e-9)
    assert operator.true_residual(x, b) <= 1e-9 and info["converged"] is True


@pytest.mark.parametrize("name", SOLVERS)
def test_zero_right_hand_side_gives_zero_without_products(name):
    operator = Operator(spd(7, seed=13), SHAPES["tuple"])
    b = (torch.zeros(3, 2, dtype=DTYPE), torch.zeros((), dtype=DTYPE))
    x, info = solve(name, operator, b)
    assert info == {"iterations": 0, "residual": 0.0, "converged": True}
    assert all(bool((t == 0).all()) and t.shape == z.shape for t, z in zip(x, b))
    assert operator.products == 0


def singular_system(seed):
    """A 6 x 6 matrix of rank 4 (non-symmetric), and its pseudo-inverse."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=DTYPE))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=DTYPE))
    matrix = u @ torch.diag(torch.tensor([3.0, 2.0, 1.5, 1.0, 0.0, 0.0], dtype=DTYPE)) @ v.T
    return Operator(matrix, [(6,)]), torch.linalg.pinv(matrix), u


@pytest.mark.parametrize(
    ("name", "options"), [("normal-cg", {}), ("dense", {"least_squares": True}), ("dense", {})]
)
def test_singular_consistent_system(name, options):
    """normal-cg and least squares give the minimum-norm solution; LU gives a solution."""
    operator, pinv, _ = singular_system(seed=14)
    x_any = torch.randn(6, dtype=DTYPE, generator=torch.Generator().manual_seed(15))
    b = (operator.matrix @ x_any,)
    x, info = solve(name, operator, b, **options)
    assert info["converged"] is True
    assert info["residual"] == pytest.approx(operator.true_residual(x, b), abs=1e-14)
    if options or name == "normal-cg":
        torch.testing.assert_close(x[0], pinv @ b[0], rtol=1e-9, atol=1e-10)


def test_normal_cg_gives_the_least_squares_solution_of_an_inconsistent_system():
    operator, pinv, u = singular_system(seed=16)
    b = (u[:, 0] + u[:, 5],)  # half of b is outside the range of A
    x, info = solve("normal-cg", operator, b)
    torch.testing.assert_close(x[0], pinv @ b[0], rtol=1e-9, atol=1e-10)
    assert info["converged"] is False and info["iterations"] < 100  # stopped, not exhausted
    assert info["residual"] == pytest.approx(2**-0.5, rel=1e-9)  # ||u_5|| / ||u_0 + u_5||


def test_breakdowns_end_without_nan():
    """BiCGSTAB on a rotation: the shadow residual is orthogonal to A b at once (GMRES solves
    it); GMRES on a nilpotent A with A b = 0: the Krylov space is invariant and holds no
    solution; CG on the zero operator: no curvature. Each stops, finite, not converged."""
    rotation = Operator(torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DTYPE), [(2,)])
    nilpotent = Operator(torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=DTYPE), [(2,)])
    zero = Operator(torch.zeros(2, 2, dtype=DTYPE), [(2,)])
    b = (torch.tensor([1.0, 0.0], dtype=DTYPE),)
    for name, operator in [("bicgstab", rotation), ("gmres", nilpotent), ("cg", zero)]:
        x, info = solve(name, operator, b)
        assert bool(torch.isfinite(x[0]).all()), name
        assert info["converged"] is False and info["residual"] == pytest.approx(1.0), name
        assert info["iterations"] <= 1, name  # stopped at the breakdown, not at the budget
    x, info = solve("gmres", rotation, b)
    assert info["converged"] and info["iterations"] == 2
    torch.testing.assert_close(x[0], torch.tensor([0.0, 1.0], dtype=DTYPE))


def test_gmres_lucky_breakdown_on_the_identity_is_exact_in_one_step():
    operator = Operator(torch.eye(5, dtype=DTYPE), [(5,)])
    b = rhs(operator, seed=17)
    x, info = solve("gmres", operator, b, tolerance=1e-15)
    assert info["iterations"] == 1 and info["converged"] and info["residual"] <= 1e-15
    torch.testing.assert_close(x[0], b[0], rtol=1e-15, atol=0)


def test_clear_errors():
    operator = Operator(spd(12, seed=18), [(3, 4)])
    b = rhs(operator, seed=19)
    with pytest.raises(ValueError, match=r"normal-cg needs rmatvec=.*A\^T v"):
        linear.normal_cg(operator.matvec, b, iterations=10, tolerance=1e-8)
    with pytest.raises(ValueError, match="12 unknowns, above max_size=5"):
        linear.dense(operator.matvec, b, iterations=1, tolerance=1e-8, max_size=5)
    assert operator.products == 0
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        solve("gmres", operator, b, iterations=0)
    with pytest.raises(ValueError, match="restart must be an integer >= 1"):
        solve("gmres", operator, b, restart=0)
    with pytest.raises(ValueError, match="tolerance must be a number >= 0"):
        solve("bicgstab", operator, b, tolerance=-1.0)
    with pytest.raises(TypeError, match="b must be a non-empty tuple of tensors"):
        solve("cg", operator, b[0])
    with pytest.raises(ValueError, match="unknown linear solver 'lu'; choose one of cg, gmres"):
        linear.solver_named("lu")
    assert linear.solver_named("normal-cg") is linear.normal_cg
