"""A learning-rate and momentum schedule tuned during one training run (real-time forward mode).

What it shows
    A softmax regression on badly scaled features is trained by minibatch SGD with heavy-ball
    momentum for 600 steps, from a timid learning rate and momentum.
    `bilevel.RealTimeHyperOptimizer` carries the derivatives of the weights with respect to
    the learning rate and the momentum along that single run (forward mode: two scalar
    hyperparameters cost about three times a plain step) and every 20 steps moves both down
    the gradient of the validation loss: the values it visits form a schedule, learnt without
    restarting training. Projections from `bilevel.constraints` keep the learning rate
    positive and the momentum in [0, 0.99] after every update. It prints the schedule and the
    validation loss and accuracy at the end, against the same run with the initial values kept
    fixed.

Cost (measured on 2 CPU cores shared with other jobs, load 3 to 6; PyTorch 2.13)
    `time python examples/02_real_time_lr_momentum.py`: 4-9 s (600 inner steps); with `--quick`
    (200 steps): 5-8 s. Starting Python and torch is 2-5 s of that.

To adapt it
    Replace `make_data`, the network and the minibatch rule in `inner` (it receives the step
    number t); any setting of the optimiser can be a hyperparameter (a callable of `h`: a
    weight decay, Adam's betas). Forward mode costs grow with the number of scalar
    hyperparameters, so keep them few (use reverse mode with `bilevel.HyperOptimizer` for
    many). `every` trades update frequency against the noise of each hypergradient.
"""

import argparse
import math
import time

import torch
from torch import nn

import bilevel

FEATURES, CLASSES, BATCH = 20, 4, 32


def make_data(generator: torch.Generator, count: int):
    """Four classes, linearly separable but for 5% flipped labels, in features whose scales
    span a factor 30: an ill-conditioned problem, where the step size and momentum matter."""
    fixed = torch.Generator().manual_seed(1)
    teacher = torch.randn(FEATURES, CLASSES, generator=fixed)
    z = torch.randn(count, FEATURES, generator=generator)
    labels = (z @ teacher).argmax(dim=1)
    flip = torch.rand(count, generator=generator) < 0.05
    labels[flip] = torch.randint(CLASSES, (int(flip.sum()),), generator=generator)
    return z * torch.logspace(-1, 0.5, FEATURES), labels


def main(quick: bool) -> None:
    began = time.perf_counter()
    torch.set_num_threads(1)  # tensors this small: more threads only add synchronisation
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x_train, y_train = make_data(generator, 5000)
    x_val, y_val = make_data(generator, 500)
    steps, every = (200, 20) if quick else (600, 20)
    batches = torch.randint(len(x_train), (steps + 1, BATCH), generator=generator)

    network = nn.Linear(FEATURES, CLASSES)  # softmax regression; any nn.Module works
    params, apply = bilevel.functional(network)
    cross_entropy = nn.functional.cross_entropy

    def inner(p, h, t):  # the minibatch of step t
        index = batches[t]
        return cross_entropy(apply(p, x_train[index]), y_train[index])

    def outer(p, h):
        return cross_entropy(apply(p, x_val), y_val)

    start = {"lr": 0.02, "momentum": 0.5}  # a deliberately timid start
    hparams = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    dynamics = bilevel.sgd(lr=lambda h: h["lr"], momentum=lambda h: h["momentum"])
    optimizer = torch.optim.Adam(
        [{"params": [hparams["lr"]], "lr": 0.01}, {"params": [hparams["momentum"]], "lr": 0.02}]
    )
    constraints = {
        "lr": bilevel.constraints.Box(1e-4, math.inf),  # positive
        "momentum": bilevel.constraints.Box(0.0, 0.99),  # and below one
    }
    schedule = [(0, start["lr"], start["momentum"])]  # (inner step, the values from then on)

    def record(metrics):
        values = {k: float(v.detach()) for k, v in hparams.items()}
        schedule.append((metrics["inner_step"], values["lr"], values["momentum"]))

    loop = bilevel.RealTimeHyperOptimizer(
        inner, outer, params, hparams, dynamics, every, optimizer,
        constraints=constraints, callbacks=[record],
    )  # fmt: skip
    loop.run(steps // every)

    def validation(trained) -> tuple[float, float]:
        with torch.no_grad():
            logits = apply(trained, x_val)
            accuracy = (logits.argmax(dim=1) == y_val).float().mean()
            return float(cross_entropy(logits, y_val)), float(accuracy)

    fixed = {k: torch.tensor(v) for k, v in start.items()}
    with torch.no_grad():  # the same run (same minibatches) with the initial values throughout
        baseline = bilevel.solve(inner, params, fixed, dynamics, steps)
    print("schedule (from inner step: lr, momentum):")
    shown = sorted({*range(0, len(schedule), max(1, len(schedule) // 6)), len(schedule) - 1})
    for step, lr, momentum in (schedule[i] for i in shown):
        print(f"  {step:4d}: {lr:.4f}, {momentum:.3f}")
    fixed_loss, fixed_accuracy = validation(baseline)
    tuned_loss, tuned_accuracy = validation(loop.params)
    print(f"fixed: lr {start['lr']}, momentum {start['momentum']} throughout")
    print(f"validation loss: fixed {fixed_loss:.4f}, tuned {tuned_loss:.4f}")
    print(f"validation accuracy: fixed {fixed_accuracy:.3f}, tuned {tuned_accuracy:.3f}")
    print(f"wall time: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (tests)")
    main(parser.parse_args().quick)
