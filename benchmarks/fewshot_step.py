"""A few-shot meta-iteration against a plain supervised step of the same network on the same
images (issue target: at most 1.05x).

Both steps run the experiment's own code on one real meta-batch of the preset: the
meta-iteration is `meta_loss` (features of all support and query images in one pass, T steps on
the per-episode heads by `bilevel.solve`, the query loss) + backward + Adam; the supervised step
is one linear classifier over the N classes of the episodes, cross-entropy of all those images +
backward + Adam. Medians of `--repeat` alternating timed steps after warm-ups.

    OMP_NUM_THREADS=1 python benchmarks/fewshot_step.py --data-dir ../shared/data \
        --preset omniglot-5w1s --preset omniglot-20w5s --preset miniimagenet-5w1s
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bilevel.app.experiments.fewshot import PRESETS, FewshotConfig
from bilevel.app.experiments.fewshot.data import class_sets, episodes
from bilevel.app.experiments.fewshot.learners import Learner, episode_groups, meta_loss


def timed(steps: dict, warmup: int, repeat: int) -> dict[str, float]:
    """Median seconds of each step; the steps alternate, so a load change hits both alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    seconds = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            began = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(s) for name, s in seconds.items()}


def measure(preset: str, data_dir: Path, warmup: int, repeat: int) -> dict:
    config = FewshotConfig(**PRESETS[preset])
    torch.manual_seed(0)
    train = class_sets(config, data_dir, ("train",))["train"]
    batch = episodes(config, train, config.meta_batch, np.random.default_rng(0)).sample()
    learner = Learner(config)
    meta_optimizer = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)

    def meta_iteration():
        meta_optimizer.zero_grad(set_to_none=True)
        loss, _ = meta_loss(learner, batch, config)
        loss.backward()
        meta_optimizer.step()

    images = torch.cat([batch.support_x, batch.query_x], 1)
    labels = torch.cat([batch.support_y, batch.query_y], 1).flatten()
    head = torch.nn.Linear(learner.net.out_features, config.ways)
    optimizer = torch.optim.Adam([*learner.net.parameters(), *head.parameters()], lr=1e-3)

    def supervised_step():
        optimizer.zero_grad(set_to_none=True)
        with episode_groups(learner.net, config.meta_batch):  # the same batch norm
            features = learner.net(images.flatten(0, 1))
        F.cross_entropy(head(features), labels).backward()
        optimizer.step()

    times = timed({"meta": meta_iteration, "supervised": supervised_step}, warmup, repeat)
    meta, supervised = times["meta"], times["supervised"]
    return {"preset": preset, "images": images.shape[0] * images.shape[1],
            "meta_s": meta, "supervised_s": supervised, "ratio": meta / supervised}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| preset | images | meta-iteration (s) | supervised step (s) | ratio |")
    print("|---|---|---|---|---|")
    for preset in args.preset:
        row = measure(preset, args.data_dir, args.warmup, args.repeat)
        print(f"| {row['preset']} | {row['images']} | {row['meta_s']:.4f} | "
              f"{row['supervised_s']:.4f} | {row['ratio']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
