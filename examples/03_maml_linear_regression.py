"""A learned initialisation for few-shot regression: MAML, first-order MAML and implicit MAML.

What it shows
    Each task is a linear regression in 20 dimensions seen through 10 examples (fewer than
    the dimensions: the data alone cannot pin the weights down); the tasks' weights scatter
    around a common vector that nobody tells the learner. A model is adapted to each task by
    gradient descent from an initialisation theta, and theta is meta-learnt so that the
    adapted model fits the task's other examples. Three hypergradients of that query loss, one
    `bilevel.solve` per meta-batch of 25 tasks (adapted together: the weights carry a leading
    task dimension and the inner loss is a sum of independent tasks):

    - MAML: `bilevel.solve(..., method="reverse")` with the initial weights a callable of the
      hyperparameters, `params=lambda h: <theta copied for every task>`, so reverse mode
      differentiates through the 5 steps into theta. (Passing w_0 tensors that require grad
      instead of a callable works too.)
    - first-order MAML: bilevel has no first-order option, so it is written by hand from the
      same pieces: the adaptation runs under `torch.no_grad()` and the gradient of the query
      loss at the adapted weights is used as theta's gradient (the Jacobian of the adapted
      weights with respect to theta replaced by the identity).
    - implicit MAML (iMAML): the inner problem gains a proximal term (reg/2) |w - theta|^2,
      so its minimiser depends on theta alone, not on the path to it; the inner run goes to
      that minimum and `bilevel.solve(..., method="implicit-cg")` differentiates it by the
      implicit function theorem: (H + reg I) q = grad solved by conjugate gradient, with no
      trajectory stored.

    It prints the query loss on 200 held-out tasks after adaptation from each learnt
    initialisation and from theta = 0, and how far each theta lies from the tasks' mean.

Cost (measured on 2 CPU cores shared with other jobs, load 3 to 6; PyTorch 2.13)
    `time python examples/03_maml_linear_regression.py`: 14-23 s (300 meta-iterations of each
    method); with `--quick` (40 each): 7-12 s. Starting Python and torch is 2-5 s of that.

To adapt it
    Replace `sample_tasks` by your task family and `predict` by your model, written for a
    leading task dimension (`torch.func.vmap` over `bilevel.functional(module)`'s apply, or a
    batched matmul as here). `INNER_STEPS`, `INNER_LR` and `PROXIMAL` are the usual MAML and
    iMAML settings; for long adaptations add `memory="checkpoint"` to the MAML solve.
    The implicit method needs the regularised inner problem solved, and convex near its
    solution (conjugate gradient). With a ReLU network on sinusoid tasks we found that
    meta-training makes the initialisation so sharp that fixed-step gradient descent on the
    regularised problem diverges after a hundred meta-iterations; a solver with a line search
    (L-BFGS under `bilevel.custom_argmin`, as in example 06) avoids that, at several times
    the cost.
"""

import argparse
import time

import torch

import bilevel

DIMENSION, SUPPORT, QUERY, TASKS_PER_BATCH = 20, 10, 15, 25
INNER_STEPS, INNER_LR = 5, 0.05  # MAML and first-order MAML: 5 steps of gradient descent
IMPLICIT_STEPS, IMPLICIT_LR, PROXIMAL = 50, 0.1, 1.0  # iMAML: a run to the regularised minimum


def task_mean() -> torch.Tensor:
    """The vector the tasks' weights scatter around (hidden from the learner)."""
    return torch.randn(DIMENSION, generator=torch.Generator().manual_seed(1))


def sample_tasks(generator: torch.Generator, tasks: int, points: int):
    """x of shape (tasks, points, DIMENSION), y of shape (tasks, points): y = x . w_task +
    noise, with w_task = task_mean() + 0.5 * a standard normal draw."""
    weights = task_mean() + 0.5 * torch.randn(tasks, DIMENSION, generator=generator)
    x = torch.randn(tasks, points, DIMENSION, generator=generator)
    y = torch.einsum("tpd,td->tp", x, weights)
    return x, y + 0.1 * torch.randn(tasks, points, generator=generator)


def predict(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tpd,td->tp", x, w["w"])


def task_loss(w, x, y) -> torch.Tensor:
    """The sum over tasks of each task's mean squared error: the tasks stay independent."""
    return ((predict(w, x) - y) ** 2).mean(dim=1).sum()


def per_task(theta, tasks: int):
    """theta copied for every task (a view: gradients flow back to theta)."""
    return {k: v.expand(tasks, *v.shape) for k, v in theta.items()}


def adapt(method: str, theta, x, y):
    """The adapted weights of each task, differentiable with respect to theta by `method`."""
    tasks = x.shape[0]
    if method == "imaml":

        def regularised(w, h):  # each task's loss plus its proximal term to theta
            proximal = sum(((w[k] - h[k]) ** 2).sum() for k in w)
            return task_loss(w, x, y) + PROXIMAL / 2 * proximal

        return bilevel.solve(
            regularised, lambda h: per_task(h, tasks), theta,
            bilevel.sgd(lr=IMPLICIT_LR, momentum=0.5), IMPLICIT_STEPS, method="implicit-cg",
            tolerance=1e-5,  # float32 rounding: a smaller residual would not be reached
        )  # fmt: skip
    dynamics = bilevel.sgd(lr=INNER_LR)
    if method == "fomaml":
        with torch.no_grad():  # no graph through the adaptation at all
            start = per_task(theta, tasks)
            return bilevel.solve(lambda w, h: task_loss(w, x, y), start, {}, dynamics, INNER_STEPS)
    return bilevel.solve(
        lambda w, h: task_loss(w, x, y), lambda h: per_task(h, tasks), theta, dynamics,
        INNER_STEPS, method="reverse",
    )  # fmt: skip


def first_order_gradient(theta, adapted, x, y) -> None:
    """First-order MAML: theta.grad = the query loss's gradient at the adapted weights, summed
    over tasks (the Jacobian of the adapted weights with respect to theta taken as I)."""
    adapted = {k: v.requires_grad_(True) for k, v in adapted.items()}
    grads = torch.autograd.grad(task_loss(adapted, x, y) / x.shape[0], list(adapted.values()))
    for key, grad in zip(adapted, grads):
        theta[key].grad = grad.sum(dim=0)


def meta_train(method: str, theta, iterations: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.Adam(theta.values(), lr=0.03)
    for _ in range(iterations):
        x, y = sample_tasks(generator, TASKS_PER_BATCH, SUPPORT + QUERY)
        x_support, x_query = x.split([SUPPORT, QUERY], dim=1)
        y_support, y_query = y.split([SUPPORT, QUERY], dim=1)
        optimizer.zero_grad()
        adapted = adapt(method, theta, x_support, y_support)
        if method == "fomaml":
            first_order_gradient(theta, adapted, x_query, y_query)
        else:  # through the adaptation, by the method adapt() chose
            (task_loss(adapted, x_query, y_query) / TASKS_PER_BATCH).backward()
        optimizer.step()


def held_out_loss(method: str, theta, tasks) -> float:
    """Mean query loss over held-out tasks after adaptation (no gradient needed)."""
    x, y = tasks
    with torch.no_grad():
        adapted = adapt(method, theta, x[:, :SUPPORT], y[:, :SUPPORT])
        return float(task_loss(adapted, x[:, SUPPORT:], y[:, SUPPORT:]) / x.shape[0])


def main(quick: bool) -> None:
    began = time.perf_counter()
    torch.set_num_threads(1)  # tensors this small: more threads only add synchronisation
    held_out = sample_tasks(torch.Generator().manual_seed(2), 200, SUPPORT + 100)
    iterations = 40 if quick else 300
    zero = {"w": torch.zeros(DIMENSION)}
    print(f"query loss on 200 held-out tasks after {SUPPORT}-shot adaptation")
    print(f"  theta = 0 (no meta-learning): {held_out_loss('maml', zero, held_out):.4f}")
    for method in ("maml", "fomaml", "imaml"):
        theta = {k: v.clone().requires_grad_(True) for k, v in zero.items()}
        seconds = time.perf_counter()
        meta_train(method, theta, iterations, torch.Generator().manual_seed(3))
        seconds = time.perf_counter() - seconds
        loss = held_out_loss(method, theta, held_out)
        distance = float((theta["w"].detach() - task_mean()).norm())
        print(
            f"  {method}: {loss:.4f} (|theta - task mean| = {distance:.3f}; "
            f"{iterations} meta-iterations, {seconds:.1f} s)"
        )
    print(f"wall time: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer meta-iterations (tests)")
    main(parser.parse_args().quick)
