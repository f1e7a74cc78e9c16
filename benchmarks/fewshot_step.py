"""A few-shot meta-iteration with and without each throughput option (fewshot/speed.py), its
data time, and its ratio to a plain supervised step of the same network on the same images
(issue target: at most 1.05x).

Both steps run the experiment's own code on one real meta-batch of the preset: the
meta-iteration is `meta_loss` (features of all support and query images in one pass, T steps on
the per-episode heads by `bilevel.solve`, the query loss) + backward + Adam; the supervised step
is one linear classifier over the N classes of the episodes, cross-entropy of all those images +
backward + Adam, under the same options. Every variant starts from the same weights; the
variants alternate within one process (a change of load hits all alike) and each reports the
median of `--repeat` timed steps after `--warmup` untimed ones.

The allocator settings (huge pages, a kept heap: speed.tune_allocator) cannot be undone inside
a process, so the variants "..., system allocator" run in a second process started with
BILEVEL_CPU_ALLOCATOR=system THP_MEM_ALLOC_ENABLE=0, whose steps alternate with this one's (one
at a time: the processes never overlap). "reference, system allocator" is the step as it was
before the options.

The data time is one draw of a meta-batch by the run's sampler (gather, rotate, scale to
float32; the decoded images are cached) and its move to the device.

    OMP_NUM_THREADS=1 python benchmarks/fewshot_step.py --data-dir ../shared/data \
        --preset miniimagenet-5w1s --repeat 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bilevel.app.data import DeviceEpisodeSampler
from bilevel.app.experiments.fewshot import PRESETS, FewshotConfig, speed
from bilevel.app.experiments.fewshot.data import class_sets, episodes
from bilevel.app.experiments.fewshot.learners import (
    Learner,
    episode_groups,
    head_logits,
    meta_loss,
    train_heads,
)

# The formulation before the options, each option alone, and the defaults (every exact option
# the device gets by default: channels_last and fused on a CPU), then bf16 on top.
VARIANTS = {
    "reference": dict(memory_format="contiguous", fused_blocks=False),
    "fused": dict(memory_format="contiguous", fused_blocks=True),
    "channels_last": dict(memory_format="channels_last", fused_blocks=False),
    "default": {},
    "bf16": dict(network_precision="bf16"),
}
WORKER = ("reference", "default")  # also measured with the system allocator
SYSTEM = "system allocator"
SUPERVISED = "supervised"


def steps(config: FewshotConfig, batch, weights: dict) -> tuple:
    """(meta-iteration, supervised step) of a learner of ``config`` starting from ``weights``."""
    learner = Learner(config)
    learner.load_state_dict(weights)
    meta_optimizer = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)

    def meta_iteration():
        meta_optimizer.zero_grad(set_to_none=True)
        loss, _ = meta_loss(learner, batch, config)
        loss.backward()
        meta_optimizer.step()

    images = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    labels = torch.cat([batch.support_y, batch.query_y], 1).flatten()
    head = torch.nn.Linear(learner.net.out_features, config.ways)
    optimizer = torch.optim.Adam([*learner.net.parameters(), *head.parameters()], lr=1e-3)

    def supervised_step():
        optimizer.zero_grad(set_to_none=True)
        with episode_groups(learner.net, config.meta_batch), learner.speed.autocast():
            features = learner.net(images)  # the same batch norm, the same options
        F.cross_entropy(head(speed.upcast(features)), labels).backward()
        optimizer.step()

    return meta_iteration, supervised_step


def setup(preset: str, data_dir: Path | None, names) -> tuple[dict, object, object]:
    """The timed steps of ``names`` on one meta-batch of ``preset``, its sampler and batch."""
    base = FewshotConfig(**PRESETS[preset])
    train = class_sets(base, data_dir, ("train",))["train"]
    sampler = episodes(base, train, base.meta_batch, np.random.default_rng(0))
    batch = sampler.sample()
    torch.manual_seed(0)
    weights = Learner(base.model_copy(update=VARIANTS["reference"])).state_dict()
    timed = {}
    for name in names:
        meta, supervised = steps(base.model_copy(update=VARIANTS[name]), batch, weights)
        timed[name], timed[f"{name} {SUPERVISED}"] = meta, supervised
    return timed, sampler, batch


def sampler_args(sampler) -> tuple:
    """The arguments of another sampler of ``sampler``'s episodes (its own generator)."""
    return (sampler.classes, sampler.ways, sampler.shots, sampler.queries, sampler.batch_size, 1)


def seconds(step) -> float:
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


def worker(preset: str, data_dir: Path | None) -> None:
    """The second process: runs the meta-iteration named on each stdin line, prints seconds."""
    timed, _, _ = setup(preset, data_dir, WORKER)
    print(any(speed.tune_allocator()), flush=True)
    for line in sys.stdin:
        print(seconds(timed[line.strip()]), flush=True)


class Worker:
    """The process with the system allocator, stepped one meta-iteration at a time."""

    def __init__(self, preset: str, data_dir: Path | None) -> None:
        command = [sys.executable, __file__, "--worker", "--preset", preset]
        if data_dir is not None:
            command += ["--data-dir", str(data_dir)]
        env = {**os.environ, speed.ALLOCATOR_ENV: "system", speed.HUGE_PAGES_ENV: "0"}
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.tuned = self.process.stdout.readline().strip() == "True"

    def __call__(self, name: str) -> float:
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def alternate(timed: dict, rounds: int, other: Worker | None = None) -> dict[str, list[float]]:
    """Seconds of every step in each of ``rounds`` rounds (the order reversed every other round,
    so that neither step of a pair always goes first), and of the WORKER steps of ``other``."""
    results: dict[str, list[float]] = {name: [] for name in timed}
    for name in WORKER if other else ():
        results[f"{name}, {SYSTEM}"] = []
    for round_ in range(rounds):
        order = list(timed.items())
        for name, step in order[::-1] if round_ % 2 else order:
            results[name].append(seconds(step))
        for name in WORKER if other else ():
            results[f"{name}, {SYSTEM}"].append(other(name))
        print(f"  round {round_ + 1}/{rounds}, load {load()}", file=sys.stderr)
    return results


def bilevel_part(config: FewshotConfig, batch) -> object:
    """The step's bilevel machinery alone: T inner steps on the heads from given features, the
    query loss and its reverse pass to the features (no network)."""
    learner = Learner(config)
    n_support = batch.support_y.shape[1]
    count = n_support + batch.query_y.shape[1]
    features = torch.randn(batch.support_y.shape[0], count, learner.net.out_features)
    features.requires_grad_()

    def step():
        support, query = features[:, :n_support], features[:, n_support:]
        heads = train_heads(learner, support, batch.support_y, config.ways,
                            config.inner_steps, config.memory)  # fmt: skip
        logits = head_logits(heads, query).reshape(-1, config.ways)
        F.cross_entropy(logits, batch.query_y.reshape(-1)).backward()

    return step


def measure(preset: str, data_dir, names, args) -> tuple[dict, dict]:
    """(all variants alternating, with the worker's steps; the default's paired rounds)."""
    timed, sampler, batch = setup(preset, data_dir, names)
    other = None
    if any(speed.tune_allocator()) and not args.no_system_allocator:
        other = Worker(preset, data_dir)
        if other.tuned:
            raise RuntimeError("the second process tuned its allocator despite being told not to")
    device = next(iter(batch)).device
    timed["data"] = lambda: sampler.sample().to(device)
    in_memory = DeviceEpisodeSampler(*sampler_args(sampler), device=device)
    timed["data in memory"] = lambda: in_memory.sample()
    timed["bilevel part"] = bilevel_part(FewshotConfig(**PRESETS[preset]), batch)
    results = alternate(timed, args.warmup + args.repeat, other)
    if other is not None:
        other.close()
    results = {name: s[args.warmup :] for name, s in results.items()}
    pair = {name: timed[name] for name in ("default", f"default {SUPERVISED}")}
    paired = {name: s[1:] for name, s in alternate(pair, args.pairs + 1).items()}
    return results, paired


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(preset: str, names, results: dict, paired: dict) -> None:
    times = {name: statistics.median(s) for name, s in results.items()}
    reference = times["reference"]
    print(f"\n{preset}: medians; speed-up against the reference (NCHW, unfused, float32)")
    print("| variant | meta-iteration (s) | speed-up | supervised step (s) | ratio meta/sup |")
    print("|---|---|---|---|---|")
    for name in names:
        meta, supervised = times[name], times[f"{name} {SUPERVISED}"]
        print(f"| {name} | {meta:.3f} | {reference / meta:.2f}x | {supervised:.3f} | "
              f"{meta / supervised:.3f} |")  # fmt: skip
    for name in WORKER:
        key = f"{name}, {SYSTEM}"
        if key in times:
            print(f"| {key} | {times[key]:.3f} | {reference / times[key]:.2f}x | | |")
    step = times["default"]
    ratios = [m / s for m, s in zip(paired["default"], paired[f"default {SUPERVISED}"])]
    spread = f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    print(f"\ndefault, {len(ratios)} more adjacent pairs: meta/supervised median "
          f"{statistics.median(ratios):.3f} ({spread})")  # fmt: skip
    part, share = 1000 * times["bilevel part"], 100 * times["bilevel part"] / step
    print(f"bilevel part alone (T inner steps on the heads and their reverse pass, no network): "
          f"{part:.1f} ms, {share:.2f}% of the default meta-iteration")  # fmt: skip
    for key, where in (("data", "memory-mapped cache"), ("data in memory", "episodes_on_device")):
        print(f"data, {where}: {1000 * times[key]:.1f} ms per meta-batch (draw, gather, scale, "
              f"move), {100 * times[key] / step:.2f}% of the default meta-iteration")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), required=True,
                        help="repeatable: one table per preset")  # fmt: skip
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help="measure these (repeatable; default: all)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8,
                        help="extra rounds of the default meta-iteration and supervised step, "
                        "for their ratio")  # fmt: skip
    parser.add_argument("--no-system-allocator", action="store_true",
                        help="skip the second process, with the system allocator")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.preset[0], args.data_dir)
    names = args.variant or list(VARIANTS)
    names = [n for n in VARIANTS if n in {"reference", "default", *names}]
    huge, heap = speed.tune_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), huge pages {huge}, "
          f"kept heap {heap}, load average {load()} (1, 5, 15 min) at the start")  # fmt: skip
    for preset in args.preset:
        results, paired = measure(preset, args.data_dir, names, args)
        report(preset, names, results, paired)
    print(f"load average {load()} at the end")


if __name__ == "__main__":
    main()
