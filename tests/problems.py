"""Small problems shared by the tests, with closed forms where they exist."""

from __future__ import annotations

import torch

import bilevel

DTYPE = torch.float64


class Ridge:
    """Least squares with one L2 weight exp(gamma_j) per feature: w_gamma in closed form.

    L(w, gamma) = |X w - y|^2 / (2n) + sum_j exp(gamma_j) w_j^2 / 2
    E(w)        = |Xv w - yv|^2 / (2m)
    """

    def __init__(self, n=40, m=30, d=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d, generator=g, dtype=DTYPE)
        w_true = torch.randn(d, generator=g, dtype=DTYPE)
        self.y = self.X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DTYPE)
        self.Xv = torch.randn(m, d, generator=g, dtype=DTYPE)
        self.yv = self.Xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=DTYPE)
        self.gamma = (0.3 * torch.randn(d, generator=g, dtype=DTYPE) - 1.0).requires_grad_(True)
        self.d = d

    def inner(self, p, h):
        r = self.X @ p["w"] - self.y
        return 0.5 * (r @ r) / len(self.y) + 0.5 * (h["gamma"].exp() * p["w"] ** 2).sum()

    def outer(self, p, h):
        r = self.Xv @ p["w"] - self.yv
        return 0.5 * (r @ r) / len(self.yv)

    def params(self):
        return {"w": torch.zeros(self.d, dtype=DTYPE)}

    def hparams(self):
        return {"gamma": self.gamma}

    def hessian(self, gamma):
        return self.X.T @ self.X / len(self.y) + torch.diag(gamma.exp())

    def exact(self):
        """(f, grad f) at the exact inner minimiser."""
        gamma = self.gamma.detach()
        A = self.hessian(gamma)
        w = torch.linalg.solve(A, self.X.T @ self.y / len(self.y))
        grad_w = self.Xv.T @ (self.Xv @ w - self.yv) / len(self.yv)
        q = torch.linalg.solve(A, grad_w)
        return float(self.outer({"w": w}, None)), -(q * w * gamma.exp())

    def exact_T(self, steps, lr):
        """(f_T, grad f_T) for gradient descent from 0, by autograd through its closed form
        w_T = (I - (I - lr A)^T) A^{-1} b: independent of the engine."""
        gamma = self.gamma.detach().clone().requires_grad_(True)
        A = self.hessian(gamma)
        b = self.X.T @ self.y / len(self.y)
        contraction = torch.linalg.matrix_power(torch.eye(self.d, dtype=DTYPE) - lr * A, steps)
        w = (torch.eye(self.d, dtype=DTYPE) - contraction) @ torch.linalg.solve(A, b)
        value = self.outer({"w": w}, None)
        (grad,) = torch.autograd.grad(value, gamma)
        return float(value.detach()), grad


def relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(a.norm()), float(b.norm()), 1e-300))


class SmallMLP:
    """A non-convex inner problem: an MLP regressor; lr and weight decay are hyperparameters."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(24, 3, generator=g, dtype=DTYPE)
        self.y = torch.sin(self.x.sum(1, keepdim=True))
        self.xv = torch.randn(16, 3, generator=g, dtype=DTYPE)
        self.yv = torch.sin(self.xv.sum(1, keepdim=True))
        self.w0 = {
            "W1": 0.5 * torch.randn(3, 8, generator=g, dtype=DTYPE),
            "b1": torch.zeros(8, dtype=DTYPE),
            "W2": 0.5 * torch.randn(8, 1, generator=g, dtype=DTYPE),
        }

    @staticmethod
    def predict(p, x):
        return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]

    def inner(self, p, h):
        return ((self.predict(p, self.x) - self.y) ** 2).mean()

    def outer(self, p, h):
        return ((self.predict(p, self.xv) - self.yv) ** 2).mean()

    def hparams(self):
        return {
            "log_lr": torch.tensor(-2.0, dtype=DTYPE, requires_grad=True),
            "log_wd": torch.tensor([-3.0, -4.0], dtype=DTYPE, requires_grad=True),
        }

    @staticmethod
    def weight_decay(h):
        """Per-group decay: one value for the weights, one for the bias."""
        wd = h["log_wd"].exp()
        return {"W1": wd[0], "W2": wd[0], "b1": wd[1]}

    def dynamics(self, kind):
        lr = lambda h: h["log_lr"].exp()  # noqa: E731
        if kind == "momentum":
            return bilevel.sgd(lr=lr, momentum=0.9, weight_decay=self.weight_decay)
        if kind == "nesterov":
            return bilevel.nesterov(lr=lr, momentum=0.5, weight_decay=self.weight_decay)
        if kind == "adam":
            return bilevel.adam(
                lr=lambda h: 0.05 * h["log_lr"].exp(), weight_decay=self.weight_decay
            )
        return bilevel.sgd(lr=lr, weight_decay=self.weight_decay)
