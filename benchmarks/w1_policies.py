"""W1's reverse-mode memory policies side by side: time per hypergradient against the inner run
(the policies alternate within one process, so a load change hits them alike) and the peak
resident memory each adds (one fresh process per policy, VmHWM above the level before the run).

    OMP_NUM_THREADS=1 python benchmarks/w1_policies.py --steps 100 --repeat 3 --memory-steps 300

`bilevel bench -w w1` runs the same workload one process per row, with the peers; this script
isolates the policies' ratios, which on a shared machine the one-process-per-row table blurs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bilevel.app.bench import w1_cleaning as w1

POLICIES = ("graph", "activations", "trajectory", "checkpoint")


def timings(steps: int, repeat: int) -> dict[str, float]:
    """Minimum seconds over `repeat` alternating runs of each policy and of the inner run."""
    d = w1.data()
    runs = {"inner run": lambda: w1.inner_training(d, steps)}
    runs |= {p: (lambda p=p: w1.bilevel_reverse(d, steps, p)) for p in POLICIES}
    for run in runs.values():  # warm-up
        run()
    seconds = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - began)
    return {name: min(s) for name, s in seconds.items()}


def peak_megabytes(policy: str, steps: int) -> float:
    """What one hypergradient adds to a fresh process's peak resident memory (Linux)."""
    code = f"""
import json, torch
torch.set_num_threads(1)
from bilevel.app.bench import w1_cleaning as w1
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
d = w1.data()
w1.bilevel_reverse(d, 3, {policy!r})  # one-off allocations are not the policy's
before = status("VmRSS")
w1.bilevel_reverse(d, {steps}, {policy!r})
print(json.dumps((status("VmHWM") - before) / 1e6))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="T for the timings")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=300, help="T for the peak memory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; T={args.steps} for time, "
          f"T={args.memory_steps} for memory")  # fmt: skip
    seconds = timings(args.steps, args.repeat)
    bound = seconds["inner run"]
    print("| policy | seconds | × inner run | peak memory added |")
    print("|---|---:|---:|---:|")
    print(f"| inner run | {bound:.2f} | 1.00 | – |")
    for policy in POLICIES:
        memory = peak_megabytes(policy, args.memory_steps)
        print(f"| {policy} | {seconds[policy]:.2f} | {seconds[policy] / bound:.2f} | "
              f"{memory:.0f} MB |")  # fmt: skip


if __name__ == "__main__":
    main()
