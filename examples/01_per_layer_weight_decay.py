"""Per-layer weight decay of your own nn.Module, tuned by reverse-mode hypergradients.

What it shows
    An MLP (a plain `torch.nn.Module`, made a function by `bilevel.functional`) trained by 100
    steps of heavy-ball gradient descent on 50 noisy examples overfits. Its three weight
    matrices each get their own L2 weight decay, `exp(log_weight_decay[layer])`, set in the
    inner optimiser (`bilevel.sgd(weight_decay=...)` returning one value per parameter).
    `bilevel.HyperOptimizer` tunes the three values with Adam on the validation loss of the
    trained network, the hypergradient computed in reverse mode with the memory policy
    `memory="checkpoint"` (about sqrt(T) stored states instead of T), and a
    `bilevel.constraints.Box` keeps them in a range where the inner run stays stable. It prints
    the validation loss (what is optimised) and the loss on a fresh test set (what is not)
    before and after.

Cost (measured on 2 CPU cores shared with other jobs, load 3 to 6; PyTorch 2.13)
    `time python examples/01_per_layer_weight_decay.py`: 7-21 s (30 hyper-iterations); with
    `--quick` (6 hyper-iterations): 4-9 s. Starting Python and torch is 2-5 s of that.

To adapt it
    Put your own module in `make_model`, your data in `make_data`, your training loss in
    `inner` and the metric to improve in `outer`. `layer_of` maps each parameter name to a
    decay group: one group per parameter, or a single group for one global decay. For long
    inner runs keep `memory="checkpoint"` (or "trajectory"); for short ones "graph" is fastest.
"""

import argparse
import math
import time

import torch
from torch import nn

import bilevel

FEATURES, HIDDEN = 10, 64


def make_data(generator: torch.Generator, count: int, noise: float = 0.5):
    """y = 2 tanh(x.u) + x.v + noise, for two fixed directions u and v of the input."""
    directions = torch.randn(2, FEATURES, generator=torch.Generator().manual_seed(1))
    u, v = directions / math.sqrt(FEATURES)
    x = torch.randn(count, FEATURES, generator=generator)
    target = 2 * torch.tanh(x @ u) + x @ v
    return x, (target + noise * torch.randn(count, generator=generator)).unsqueeze(1)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
        nn.Linear(HIDDEN, 1),
    )  # fmt: skip


def main(quick: bool) -> None:
    began = time.perf_counter()
    torch.set_num_threads(1)  # tensors this small: more threads only add synchronisation
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x_train, y_train = make_data(generator, 50)
    x_val, y_val = make_data(generator, 200)
    x_test, y_test = make_data(generator, 2000)

    params, apply = bilevel.functional(make_model())  # w_0 and the network as a function
    weight_names = [name for name in params if name.endswith("weight")]
    layer_of = {name: layer for layer, name in enumerate(weight_names)}

    def weight_decay(h):  # one value per parameter name; the biases are not decayed
        decay = h["log_weight_decay"].exp()
        return {name: decay[layer_of[name]] if name in layer_of else 0.0 for name in params}

    def inner(p, h):
        return ((apply(p, x_train) - y_train) ** 2).mean()

    def outer(p, h):
        return ((apply(p, x_val) - y_val) ** 2).mean()

    hparams = {"log_weight_decay": torch.full((len(weight_names),), math.log(1e-3))}
    hparams["log_weight_decay"].requires_grad_(True)
    dynamics = bilevel.sgd(lr=0.1, momentum=0.9, weight_decay=weight_decay)
    steps = 100
    loop = bilevel.HyperOptimizer(
        inner, outer, params, hparams, dynamics, steps,
        torch.optim.Adam(hparams.values(), lr=0.3),
        method="reverse", memory="checkpoint",
        # keep every decay in [1e-6, 1]: far larger ones make this inner learning rate diverge
        constraints={"log_weight_decay": bilevel.constraints.Box(math.log(1e-6), 0.0)},
    )  # fmt: skip

    def losses() -> tuple[float, float]:  # (validation, test) of the network trained under h
        with torch.no_grad():
            trained = bilevel.solve(inner, params, hparams, dynamics, steps)
            test = ((apply(trained, x_test) - y_test) ** 2).mean()
            return float(outer(trained, hparams)), float(test)

    before = losses()
    history = loop.run(6 if quick else 30)
    after = losses()
    print(f"hyper-iterations: {len(history)}")
    decays = ", ".join(f"{v:.2e}" for v in hparams["log_weight_decay"].detach().exp().tolist())
    print(f"weight decay per layer: {decays}")
    print(f"validation loss: before {before[0]:.4f}, after {after[0]:.4f}")
    print(f"test loss: before {before[1]:.4f}, after {after[1]:.4f}")
    print(f"wall time: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer hyper-iterations (tests)")
    main(parser.parse_args().quick)
