"""Learning problems for the stochastic solvers: the selection of regularisation weights for
logistic regression, and data cleaning, on tensors the caller gives.

    LogisticRegularisation   binary logistic regression, one weight exp(x_k) per feature
    SoftmaxRegularisation    multinomial logistic regression, one weight exp(x_c) per class
    DataCleaning             multinomial logistic regression with one weight sigmoid(x_i) per
                             training example, a fraction of whose labels is corrupted

Their value function h(x) = F(x, z*(x)) has no closed form: `inner_solution` solves the inner
problem on the full batch (Newton-CG), `value` and `hypergradient` use it (the hypergradient by
conjugate gradient on the inner Hessian, through the problem's own products), and
`reference_metrics` adds h(x), ||z - z*(x)|| and the test accuracy to every evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import validate
from ..hypergrad.linear import conjugate_gradient
from .problem import StochasticProblem


class LearningProblem(StochasticProblem):
    """A StochasticProblem evaluated through a full-batch solve of its inner problem.

    Args (besides StochasticProblem's):
        test: (features, labels) of held-out examples, or None; with them each evaluation
            reports `test_accuracy`, the accuracy of the current z.
        exact_value: whether each evaluation solves the inner problem at x to report
            `value` h(x) and `inner_error` ||z - z*(x)|| (costly for large inner problems).
        solve_tolerance: the inner solve stops when max |grad_z G| <= solve_tolerance
            (default 10 eps of the dtype), or when rounding stops its progress.
        solve_iterations: the most Newton steps of one inner solve.
    """

    def __init__(
        self,
        inner,
        outer,
        x: dict[str, Tensor],
        z: dict[str, Tensor],
        n_inner: int,
        n_outer: int,
        *,
        test: tuple[Tensor, Tensor] | None = None,
        exact_value: bool = True,
        solve_tolerance: float | None = None,
        solve_iterations: int = 100,
    ):
        super().__init__(inner, outer, x, z, n_inner, n_outer)
        self.test = test
        self.exact_value = bool(exact_value)
        # by default: until rounding stops the Newton steps (10 eps is below what they reach)
        default = 10 * torch.finfo(self.dtype).eps
        self.solve_tolerance = default if solve_tolerance is None else float(solve_tolerance)
        self.solve_iterations = validate.positive_int("solve_iterations", solve_iterations)

    # -- the value function ------------------------------------------------------------------

    def inner_solution(self, x: Tensor, start: Tensor | None = None) -> Tensor:
        """z*(x) as a flat vector, by inexact Newton on G(x, .) over every inner sample from
        `start` (z's starting values by default).

        Each step solves the Newton system by conjugate gradient on Hessian-vector products to
        relative residual min(1/2, sqrt ||grad||) and backtracks until the value decreases
        (Armijo). Near z* the value no longer resolves the decrease while the gradient does, so
        a full step that reduces ||grad_z G|| is taken too. Stops when max |grad_z G| <=
        `solve_tolerance`, when no step reduces either (rounding error), or after
        `solve_iterations` steps.
        """
        z = (self.z0 if start is None else start).detach().clone()
        value, gradient = self._inner_value_and_gradient(x, z)
        for _ in range(self.solve_iterations):
            norm = float(torch.linalg.vector_norm(gradient))
            if float(gradient.abs().max()) <= self.solve_tolerance:
                break
            forcing = max(min(0.5, norm**0.5), 1e3 * torch.finfo(self.dtype).eps)
            step = self._solve_hessian(x, z, gradient, forcing)
            found = self._line_search(x, z, value, gradient, step)
            if found is None:
                break
            z, value, gradient = found
        return z

    def _line_search(self, x: Tensor, z: Tensor, value: Tensor, gradient: Tensor, step: Tensor):
        """(z - t step, its value, its gradient) for the first t in 1, 1/2, ... that decreases G
        enough (Armijo) or, at t = 1, reduces ||grad_z G||; None when none does."""
        slope, norm = float(gradient @ step), torch.linalg.vector_norm(gradient)
        rate = 1.0
        while rate > 1e-10:
            candidate = z - rate * step
            new_value, new_gradient = self._inner_value_and_gradient(x, candidate)
            decreased = float(new_value) <= float(value) - 1e-4 * rate * slope
            flatter = rate == 1.0 and torch.linalg.vector_norm(new_gradient) < norm
            if decreased or flatter:
                return candidate, new_value, new_gradient
            rate /= 2
        return None

    def _inner_value_and_gradient(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """(G(x, z), grad_z G(x, z)) over every inner sample."""
        z = z.detach().requires_grad_(True)
        everything = self.everything(self.n_inner)
        with torch.enable_grad():
            value = self.inner(self.x_layout.unflatten(x), self.z_layout.unflatten(z), everything)
            (gradient,) = torch.autograd.grad(value, [z])
        return value.detach(), gradient

    def _solve_hessian(self, x: Tensor, z: Tensor, b: Tensor, tolerance=None) -> Tensor:
        """[d2_zz G(x, z)]^{-1} b over every inner sample, by conjugate gradient to relative
        residual `tolerance` (default: 1e3 machine epsilons)."""
        everything = self.everything(self.n_inner)

        def hessian_times(v):
            return (self.inner_products(x, z, v[0], everything)[1],)

        tolerance = 1e3 * torch.finfo(self.dtype).eps if tolerance is None else tolerance
        (solution,), _ = conjugate_gradient(
            hessian_times, (b,), iterations=10 * z.numel(), tolerance=tolerance
        )
        return solution

    def value(self, x: Tensor, start: Tensor | None = None) -> float:
        """h(x) = F(x, z*(x)) over every outer sample (z* solved from `start`)."""
        z = self.inner_solution(x, start)
        return float(self.outer_value(x, z, self.everything(self.n_outer)))

    def hypergradient(
        self, x: Tensor, start: Tensor | None = None, tolerance: float | None = None
    ) -> Tensor:
        """grad h(x) = grad_x F + d2_xz G v*, v* = -[d2_zz G]^{-1} grad_z F at z*(x), all full
        batch; the linear system by conjugate gradient to relative residual `tolerance`
        (default: 1e3 machine epsilons)."""
        z = self.inner_solution(x, start)
        outer_x, outer_z = self.outer_gradients(x, z, self.everything(self.n_outer))
        v = -self._solve_hessian(x, z, outer_z, tolerance)
        return outer_x + self.inner_products(x, z, v, self.everything(self.n_inner))[2]

    # -- evaluations -------------------------------------------------------------------------

    def reference_metrics(self, x, z, v) -> dict[str, float]:
        """test_accuracy of z (with test data); with exact_value, value h(x) and inner_error
        ||z - z*(x)|| (z* solved from z)."""
        z_flat = self.z_layout.flatten(z)
        metrics = {}
        if self.exact_value:
            x_flat = self.x_layout.flatten(x)
            z_star = self.inner_solution(x_flat, start=z_flat)
            outer = self.outer_value(x_flat, z_star, self.everything(self.n_outer))
            metrics["value"] = float(outer)
            metrics["inner_error"] = float(torch.linalg.vector_norm(z_flat - z_star))
        if self.test is not None:
            metrics["test_accuracy"] = self.accuracy(z, *self.test)
        return metrics

    def accuracy(self, z: dict[str, Tensor], features: Tensor, labels: Tensor) -> float:
        """The fraction of `labels` the model z predicts from `features`."""
        raise NotImplementedError


# -- regularisation selection -------------------------------------------------------------------


class LogisticRegularisation(LearningProblem):
    """Binary logistic regression with one L2 weight per feature, chosen on validation data:

        g_i(x, z) = log(1 + exp(-y_i a_i^T z)) + 1/2 sum_k exp(x_k) z_k^2   (training sample i)
        f_j(x, z) = log(1 + exp(-y_j a_j^T z))                              (validation sample j)

    (Dagreou et al. 2022's ijcnn1 problem.) No intercept: every weight of z is regularised, so
    G is strongly convex in z with modulus min_k exp(x_k).

    Args:
        features: the training (inner) samples' features, [n, d] floating point.
        labels: their labels, [n] in {-1, +1} (any dtype).
        val_features: the validation (outer) samples' features, likewise.
        val_labels: their labels.
        test: (features, labels) of test samples, or None.
        log_weights: x's starting value, one number for every feature (default 0: weights 1).
        **options: LearningProblem's (exact_value, solve_tolerance, solve_iterations).

    x = {"log_weights": [d]}, z = {"w": [d]} starting at zero, in the features' dtype and device.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        val_features: Tensor,
        val_labels: Tensor,
        *,
        test: tuple[Tensor, Tensor] | None = None,
        log_weights: float = 0.0,
        **options,
    ):
        (self.a, self.y), (self.a_val, self.y_val), test = _splits(
            features, labels, val_features, val_labels, test, signs=True
        )
        d = self.a.shape[1]
        x = {"log_weights": torch.full((d,), float(log_weights), **_kind(self.a))}
        z = {"w": torch.zeros(d, **_kind(self.a))}
        super().__init__(
            self._inner, self._outer, x, z, len(self.a), len(self.a_val), test=test, **options
        )

    def _inner(self, x, z, batch):
        w = z["w"]
        loss = F.softplus(-self.y[batch] * (self.a[batch] @ w)).mean()
        return loss + 0.5 * (x["log_weights"].exp() * w**2).sum()

    def _outer(self, x, z, batch):
        return F.softplus(-self.y_val[batch] * (self.a_val[batch] @ z["w"])).mean()

    def accuracy(self, z, features, labels) -> float:
        predicted = torch.where(features @ z["w"] >= 0, 1.0, -1.0)
        return float((predicted == labels).to(torch.float64).mean())


class SoftmaxRegularisation(LearningProblem):
    """Multinomial logistic regression with one L2 weight per class, chosen on validation data:

        g_i(x, z) = CE(a_i^T W, y_i) + 1/2 sum_c exp(x_c) ||W[:, c]||^2
        f_j(x, z) = CE(a_j^T W, y_j)

    (Dagreou et al. 2022's covtype problem.) No intercept, so G is strongly convex in W.

    Args:
        features: the training (inner) samples' features, [n, d].
        labels: their class indices, [n] in 0 .. classes - 1.
        val_features: the validation (outer) samples' features.
        val_labels: their class indices.
        classes: the number of classes (default: 1 + the largest label seen).
        test: as LogisticRegularisation's.
        log_weights: as LogisticRegularisation's.
        **options: as LogisticRegularisation's.

    x = {"log_weights": [classes]}, z = {"W": [d, classes]} starting at zero.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        val_features: Tensor,
        val_labels: Tensor,
        *,
        classes: int | None = None,
        test: tuple[Tensor, Tensor] | None = None,
        log_weights: float = 0.0,
        **options,
    ):
        (self.a, self.y), (self.a_val, self.y_val), test = _splits(
            features, labels, val_features, val_labels, test
        )
        self.classes = _classes(classes, self.y, self.y_val)
        d = self.a.shape[1]
        x = {"log_weights": torch.full((self.classes,), float(log_weights), **_kind(self.a))}
        z = {"W": torch.zeros(d, self.classes, **_kind(self.a))}
        super().__init__(
            self._inner, self._outer, x, z, len(self.a), len(self.a_val), test=test, **options
        )

    def _inner(self, x, z, batch):
        W = z["W"]
        loss = F.cross_entropy(self.a[batch] @ W, self.y[batch])
        return loss + 0.5 * (x["log_weights"].exp() * W**2).sum()

    def _outer(self, x, z, batch):
        return F.cross_entropy(self.a_val[batch] @ z["W"], self.y_val[batch])

    def accuracy(self, z, features, labels) -> float:
        return _softmax_accuracy(z["W"], features, labels)


# -- data cleaning ------------------------------------------------------------------------------


class DataCleaning(LearningProblem):
    """Data cleaning (Franceschi et al. 2017; Dagreou et al. 2022): multinomial logistic
    regression on training examples a `corruption` fraction of whose labels is wrong, with one
    weight sigmoid(x_i) per training example, chosen on clean validation data:

        g_i(x, z) = sigmoid(x_i) CE(a_i^T W, y~_i) + regularisation/2 ||W||^2
        f_j(x, z) = CE(a_j^T W, y_j)

    The corrupted labels y~: round(corruption * n) training examples drawn with `seed` get a
    label drawn uniformly among the OTHER classes (so each is wrong). `corrupted` is their
    mask; each evaluation reports `corrupted_weight` and `clean_weight`, the mean
    sigmoid(x_i) over the corrupted and the clean examples (the first should fall).

    Args:
        features: the training (inner) samples' features, [n, d].
        labels: their clean class indices, [n].
        val_features: the clean validation (outer) samples' features.
        val_labels: their class indices.
        corruption: the fraction p in [0, 1) of training labels corrupted.
        regularisation: the L2 coefficient on W (> 0: G strongly convex in W).
        classes: the number of classes (default: 1 + the largest label seen).
        seed: seeds the corruption (its own generator).
        test: (features, labels) of clean test samples, or None.
        **options: LearningProblem's; exact_value defaults to False here (z has d x classes
            entries and x one per training example: a solve per evaluation is costly).

    x = {"logits": [n]} starting at zero (weights 1/2), z = {"W": [d, classes]} at zero.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        val_features: Tensor,
        val_labels: Tensor,
        *,
        corruption: float,
        regularisation: float = 0.1,
        classes: int | None = None,
        seed: int = 0,
        test: tuple[Tensor, Tensor] | None = None,
        **options,
    ):
        (self.a, clean), (self.a_val, self.y_val), test = _splits(
            features, labels, val_features, val_labels, test
        )
        if not isinstance(corruption, (int, float)) or not 0 <= corruption < 1:
            raise ValueError(f"corruption must be a number in [0, 1), got {corruption!r}")
        if not isinstance(regularisation, (int, float)) or not regularisation > 0:
            raise ValueError(f"regularisation must be a number > 0, got {regularisation!r}")
        self.classes = _classes(classes, clean, self.y_val)
        self.corruption, self.regularisation = float(corruption), float(regularisation)
        self.y, self.corrupted = corrupt_labels(clean, self.corruption, self.classes, seed)
        x = {"logits": torch.zeros(len(self.a), **_kind(self.a))}
        z = {"W": torch.zeros(self.a.shape[1], self.classes, **_kind(self.a))}
        options.setdefault("exact_value", False)
        super().__init__(
            self._inner, self._outer, x, z, len(self.a), len(self.a_val), test=test, **options
        )

    def _inner(self, x, z, batch):
        W = z["W"]
        losses = F.cross_entropy(self.a[batch] @ W, self.y[batch], reduction="none")
        weights = torch.sigmoid(x["logits"][batch])
        return (weights * losses).mean() + 0.5 * self.regularisation * (W**2).sum()

    def _outer(self, x, z, batch):
        return F.cross_entropy(self.a_val[batch] @ z["W"], self.y_val[batch])

    def accuracy(self, z, features, labels) -> float:
        return _softmax_accuracy(z["W"], features, labels)

    def reference_metrics(self, x, z, v) -> dict[str, float]:
        """LearningProblem's, and the mean weight of the corrupted and of the clean examples."""
        weights = torch.sigmoid(x["logits"])
        metrics = super().reference_metrics(x, z, v)
        if bool(self.corrupted.any()):
            metrics["corrupted_weight"] = float(weights[self.corrupted].mean())
        if not bool(self.corrupted.all()):
            metrics["clean_weight"] = float(weights[~self.corrupted].mean())
        return metrics


def corrupt_labels(labels: Tensor, fraction: float, classes: int, seed: int):
    """(labels with round(fraction * n) of them, drawn with `seed`, replaced by a uniformly drawn
    OTHER class; the boolean mask of those replaced)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]
    shift = torch.randint(1, classes, (len(chosen),), generator=generator)
    corrupted = labels.clone()
    corrupted[chosen.to(labels.device)] = (
        (labels.cpu()[chosen] + shift).remainder(classes).to(labels.device)
    )
    mask = torch.zeros(n, dtype=torch.bool, device=labels.device)
    mask[chosen.to(labels.device)] = True
    return corrupted, mask


# -- checks of the data -------------------------------------------------------------------------


def _kind(tensor: Tensor) -> dict:
    return {"dtype": tensor.dtype, "device": tensor.device}


def _splits(features, labels, val_features, val_labels, test, signs=False):
    """The training, validation and (if given) test (features, labels), each checked."""
    train = _samples("features", features, "labels", labels, signs)
    val = _samples("val_features", val_features, "val_labels", val_labels, signs, train[0])
    if test is not None:
        test = _samples("test features", test[0], "test labels", test[1], signs, train[0])
    return train, val, test


def _samples(feature_name, features, label_name, labels, signs=False, like=None):
    """(features, labels) checked: [n, d] floating point and [n] labels of the same n; labels
    in {-1, +1} as the features' dtype (`signs`), else class indices as int64."""
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise TypeError(f"{feature_name} must be a 2-D floating-point tensor, got {shape}")
    if like is not None and features.shape[1] != like.shape[1]:
        raise ValueError(
            f"{feature_name} has {features.shape[1]} features, the training features "
            f"{like.shape[1]}"
        )
    if like is not None and (features.dtype, features.device) != (like.dtype, like.device):
        raise TypeError(
            f"{feature_name} is {features.dtype} on {features.device}, the training features "
            f"{like.dtype} on {like.device}"
        )
    if not isinstance(labels, Tensor) or labels.shape != features.shape[:1]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{label_name} must be a tensor of shape ({len(features)},), got {shape}")
    if signs:
        if not bool(((labels == 1) | (labels == -1)).all()):
            raise ValueError(f"{label_name} must be -1 or +1 (binary classification)")
        return features, labels.to(features.dtype)
    if labels.is_floating_point() or labels.is_complex() or bool((labels < 0).any()):
        raise ValueError(f"{label_name} must be class indices (integers >= 0)")
    return features, labels.long()


def _classes(classes: int | None, *labels: Tensor) -> int:
    seen = 1 + max(int(y.max()) for y in labels)
    if classes is None:
        return max(seen, 2)
    classes = validate.positive_int("classes", classes)
    if classes < seen:
        raise ValueError(f"classes={classes} but a label is {seen - 1}")
    return classes


def _softmax_accuracy(W: Tensor, features: Tensor, labels: Tensor) -> float:
    return float(((features @ W).argmax(1) == labels).to(torch.float64).mean())
