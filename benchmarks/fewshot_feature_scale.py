"""The effective inner step of trained few-shot runs: inner lr x squared feature norm.

The heads take T gradient steps of size lr on a loss whose curvature in W scales with the squared
norm of the features, so lr * |phi|^2 is the step that matters. This prints it for the best
(best.pt) and the last (checkpoint.pt) network of each run, with the scale (|gamma|) of each
batch-norm layer: the diagnosis of the decline in docs/experiments.md.

    python benchmarks/fewshot_feature_scale.py RUN [RUN ...] --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bilevel.app import checkpoints
from bilevel.app.data.omniglot import load_omniglot
from bilevel.app.experiments.fewshot.config import FewshotConfig
from bilevel.app.experiments.fewshot.learners import Learner
from bilevel.app.experiments.fewshot.train import training_run

IMAGES = 100  # drawings of distinct characters, normalised together as one batch


def sample_images(data_dir: Path, seed: int = 0) -> torch.Tensor:
    data = load_omniglot(data_dir / "omniglot", download=False)
    characters = np.random.default_rng(seed).choice(len(data.images), IMAGES, replace=False)
    pixels = data.images[characters, 0].astype(np.float32) / 255
    return torch.from_numpy(pixels).unsqueeze(1)


def describe(run: Path, name: str, images: torch.Tensor) -> str:
    settings, _ = training_run(run)
    config = FewshotConfig(**{**settings, "device": "cpu", "init_from": None})
    state = checkpoints.load(run / name)
    learner = Learner(config)
    learner.load_state_dict(
        {k: v for k, v in state["learner"].items() if not k.startswith("classifier.")}
    )
    learner.train()  # batch statistics, as in training and transductive testing
    with torch.no_grad():
        norm = float(learner.net(images).norm(dim=1).mean())
    gammas = [
        float(m.weight.detach().abs().mean())
        for m in learner.net.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    lr = learner.inner_lr()
    return (
        f"| {run.name} | {name} | {state['progress']['iteration']} | {lr:.3f} | {norm:.1f} "
        f"| {lr * norm**2:.0f} | {' / '.join(f'{g:.2f}' for g in gammas)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    images = sample_images(args.data_dir)
    columns = ["run", "network", "iteration", "inner lr", "|phi|", "lr x |phi|^2", "BN |gamma|"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        for name in ("best.pt", "checkpoint.pt"):
            if (run / name).is_file():
                print(describe(run, name, images))


if __name__ == "__main__":
    main()
