"""One measurement in its own process: `python -m bilevel.app.bench.child '<json spec>'`.

The spec names workload, size, impl, mode, device and threads. The child builds the data, makes
one warm-up call (lazy imports and one-time initialisation stay out of the baseline), takes the
memory baseline, makes the remaining warm-up calls, times the repetitions and prints one line
`RESULT <json>`. The
implementation "reference" instead computes and caches the float64 hypergradient.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback

import torch

from . import workloads
from .common import LOWER_BOUND, reference_path, relative_error
from .measure import Meter

PREFIX = "RESULT "


def measure(spec: dict) -> dict:
    workload, size, device = workloads.get(spec["workload"]), spec["size"], spec["device"]
    reference = None if spec["impl"] == LOWER_BOUND else _load_reference(spec)
    run = workload.build(spec["impl"], size, device)
    warmups, reps = workload.repetitions(spec["mode"], size)
    warm = workload.build(spec["impl"], workload.warmup_size(size), device)
    if warmups:
        warm()  # one-time costs out of the baseline: lazy imports (autograd.grad imports sympy)
    gc.collect()
    meter = Meter(torch.device(device))
    meter.start()
    for _ in range(warmups - 1):
        warm()
    times, error = [], None
    for i in range(reps):
        seconds, estimate = meter.time(run)
        times.append(seconds)
        if i == 0 and estimate is not None and reference is not None:
            error = relative_error(estimate, reference)
        del estimate
    return {
        "times": times,
        "peak_bytes": meter.peak_bytes(),
        "baseline_bytes": meter.baseline,
        "memory_method": meter.method,
        "error": error,
        "warmups": warmups,
    }


def make_reference(spec: dict) -> dict:
    workload = workloads.get(spec["workload"])
    began = time.perf_counter()
    value = workload.reference(spec["size"]).detach().cpu()
    torch.save(value, reference_path(spec["workload"], spec["size"]))
    return {"times": [time.perf_counter() - began]}


def _load_reference(spec: dict):
    path = reference_path(spec["workload"], spec["size"])
    return torch.load(path) if path.exists() else None


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    torch.manual_seed(0)
    try:
        result = make_reference(spec) if spec["impl"] == "reference" else measure(spec)
    except Exception as error:  # reported as a failed row, never hidden
        traceback.print_exc()
        result = {"failure": f"{type(error).__name__}: {error}"[:300]}
    result.update(spec, threads=torch.get_num_threads(), torch=torch.__version__)
    print(PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
