"""A hyper-representation for your own few-shot data: shared features, per-episode linear heads.

What it shows
    Synthetic 5-way 5-shot episodes: each class is a point of a hidden 5-dimensional space, seen
    through a fixed nonlinear map and buried among 32 dimensions of loud nuisance. A small
    network (the representation, shared by every episode) maps inputs to 16 features; in each
    episode a linear head on those features is trained on the 25 support examples by 20 steps of
    gradient descent (the inner problem), and the network is meta-trained with Adam on the query
    loss of the trained heads. The heads come from `bilevel.solve`, whose hyperparameters are
    the support features themselves: outputs of the network, not leaves, so `loss.backward()` on
    the query loss passes the hypergradient on into the network's weights (the
    hyper-representation of Franceschi et al., ICML 2018). Eight episodes are solved together
    (the heads carry a leading episode dimension). It prints the query accuracy on 300 held-out
    episodes with the network before and after meta-training, and with heads on the raw inputs.

Cost (measured on 2 CPU cores shared with other jobs, load 3 to 6; PyTorch 2.13)
    `time python examples/05_hyper_representation.py`: 13-22 s (400 meta-iterations); with
    `--quick` (50): 6-12 s. Starting Python and torch is 2-5 s of that.

To adapt it
    Replace `sample_episodes` by your episode sampler and `Representation` by your network
    (a convolutional one for images); nothing else changes. More inner steps give heads closer
    to their optimum; with many, `method="implicit-cg"` in `fit_heads` (the heads' problem is
    strongly convex) keeps the memory of a single step.
"""

import argparse
import math
import time

import torch
from torch import nn

import bilevel

WAYS, SHOTS, QUERIES = 5, 5, 10
HIDDEN_DIM, SIGNAL_DIM, NUISANCE_DIM, FEATURES = 5, 8, 32, 16
EPISODES_PER_BATCH, INNER_STEPS = 8, 20


class Representation(nn.Module):
    def __init__(self):
        super().__init__()
        inputs = SIGNAL_DIM + NUISANCE_DIM
        self.layers = nn.Sequential(nn.Linear(inputs, 64), nn.ReLU(), nn.Linear(64, FEATURES))

    def forward(self, x):
        return self.layers(x)


def sample_episodes(generator: torch.Generator, episodes: int):
    """x_support (E, WAYS*SHOTS, D), y_support, x_query (E, WAYS*QUERIES, D), y_query."""
    fixed = torch.Generator().manual_seed(1)
    signal_map = torch.randn(HIDDEN_DIM, SIGNAL_DIM, generator=fixed)
    mixing, _ = torch.linalg.qr(torch.randn(SIGNAL_DIM + NUISANCE_DIM, SIGNAL_DIM + NUISANCE_DIM,
                                            generator=fixed))  # fmt: skip
    centres = torch.randn(episodes, WAYS, 1, HIDDEN_DIM, generator=generator)

    def draw(per_class: int):
        hidden = centres + 0.3 * torch.randn(episodes, WAYS, per_class, HIDDEN_DIM,
                                             generator=generator)  # fmt: skip
        signal = torch.tanh(hidden @ signal_map)
        nuisance = 2 * torch.randn(episodes, WAYS, per_class, NUISANCE_DIM, generator=generator)
        x = torch.cat([signal, nuisance], dim=-1) @ mixing
        labels = torch.arange(WAYS).repeat_interleave(per_class).expand(episodes, -1)
        return x.reshape(episodes, WAYS * per_class, -1), labels

    return (*draw(SHOTS), *draw(QUERIES))


def head_logits(head, features):
    return torch.baddbmm(head["bias"], features, head["weight"])


def episode_losses(logits, labels) -> torch.Tensor:
    """Each episode's mean cross-entropy, shape (episodes,)."""
    per_example = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return per_example.mean(dim=1)


def fit_heads(support_features, labels):
    """The heads trained on the support features; differentiable with respect to them."""
    episodes, features = support_features.shape[0], support_features.shape[-1]

    def inner(head, h):  # the episodes are independent: a sum of their losses
        loss = episode_losses(head_logits(head, h["features"]), labels).sum()
        return loss + 1e-2 * (head["weight"] ** 2).sum()

    start = {
        "weight": torch.zeros(episodes, features, WAYS),
        "bias": torch.zeros(episodes, 1, WAYS),
    }
    return bilevel.solve(
        inner, start, {"features": support_features}, bilevel.sgd(lr=1.0, momentum=0.5),
        INNER_STEPS,
    )  # fmt: skip


def query_accuracy(represent, episodes) -> float:
    """Mean query accuracy over the episodes, heads fitted on `represent(x)` (no gradients)."""
    x_support, y_support, x_query, y_query = episodes
    with torch.no_grad():
        heads = fit_heads(represent(x_support), y_support)
        predicted = head_logits(heads, represent(x_query)).argmax(dim=-1)
        return float((predicted == y_query).float().mean())


def main(quick: bool) -> None:
    began = time.perf_counter()
    torch.set_num_threads(1)  # tensors this small: more threads only add synchronisation
    torch.manual_seed(0)
    network = Representation()
    held_out = sample_episodes(torch.Generator().manual_seed(2), 300)
    # the baseline: heads on the inputs themselves, scaled by 1/sqrt(dimension) so that the
    # heads' learning rate suits them too
    raw = query_accuracy(lambda x: x / math.sqrt(x.shape[-1]), held_out)
    before = query_accuracy(network, held_out)

    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(3)
    iterations = 50 if quick else 400
    for _ in range(iterations):
        x_support, y_support, x_query, y_query = sample_episodes(generator, EPISODES_PER_BATCH)
        heads = fit_heads(network(x_support), y_support)  # a node of the autograd graph
        loss = episode_losses(head_logits(heads, network(x_query)), y_query).mean()
        optimizer.zero_grad()
        loss.backward()  # through the inner solve into the support features, then the network
        optimizer.step()

    after = query_accuracy(network, held_out)
    print(f"meta-iterations: {iterations}")
    print(f"query accuracy on 300 held-out episodes ({WAYS}-way {SHOTS}-shot):")
    print(f"  heads on the raw inputs: {raw:.3f}")
    print(f"  query accuracy: before {before:.3f}, after {after:.3f}")
    print(f"wall time: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer meta-iterations (tests)")
    main(parser.parse_args().quick)
