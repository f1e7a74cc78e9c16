"""method="auto": the fastest exact method whose memory fits a budget.

`choose` measures the problem once and picks a concrete method and options; `bilevel.Problem`
does this when it is created (so a Problem always holds a concrete method) and reports the
decision in `Result.info["auto"]`. What is measured, on w_0:

    g  the bytes one differentiated step adds to a kept graph: two steps are taken with their
       graphs chained, and what the second saves for backward (saved-tensor hooks, counted once
       per storage), less what the first saved too (data, hyperparameters), is one step's
       share; plus SAVED_TENSOR_OVERHEAD for each tensor it saves (autograd's nodes, the
       tensors' metadata, the allocator's headers: about 30 KB a step on CPU for 18 saved
       tensors, whatever their sizes, which is most of a small model's step)
    a  the bytes one step's graph of the inner objective alone keeps (memory="activations"),
       measured the same way on two steps that keep only that graph, with its saved tensors'
       overhead
    s  the bytes of the inner state: parameters and optimiser slots
    r  the bytes of the random generators' state stored with each segment start (replays)
    m  the number of scalar hyperparameters; T the number of steps

and the estimates of the peak, fitted on an H200, where CUDA's allocator counts every byte (its
peak allocated over the estimate: 1.00-1.11 for reverse mode's three policies, 0.83-1.00 for
forward mode at m = 1 and 16):

    reverse, segments of k steps   floor((T-1)/k)·(s + r) + (k + 2.5)·g
        the stored segment starts, the last segment's graph (kept) or a replayed one, and the
        backward pass's own gradients through a step (1.5 g);
        k = T is memory="graph", k = 1 "trajectory", else "checkpoint" with checkpoint_every=k
    reverse, memory="activations"  (T-1)·(s + a) + (1 + 2.5)·g
    forward (vectorize=True)       2·m·s (tangents in and out) + m²·itemsize (the basis)
                                   + 2.5·(m + 1)·g (the step's graphs, batched over m)
    forward (vectorize=False)      2·m·s + m²·itemsize + 6·g

each times ALLOCATOR_FACTOR: what the process holds is more than what its tensors need (CUDA's
caching allocator reserved up to 1.35x the estimate; glibc's resident memory was 0.9-1.1x with
large tensors, but up to 2.8x for a small model's trajectory, its heap fragmented).

The rule, by speed (docs/benchmarks.md: graph ≈ 1.9x plain inner training, replaying reverse
≈ 2.8-3.1x, forward ≈ 2.1·(m+1)x vectorized and 3.3·(m+1)x in turn):

1. reverse mode: the whole graph (no replay) if it fits; else memory="activations" (no
   evaluation of the objective replayed: ≈ 2.3x on W1) if it fits; else the longest segments
   that fit: every step outside the last segment is replayed once, so longer segments replay
   fewer steps.
2. only if no segment length fits: forward mode, whose memory does not grow with T, when
   m <= MAX_FORWARD_HPARAMS (beyond that it takes over 30x the inner training) and w_0 needs
   no gradient (forward mode cannot give one: a d x d Jacobian).
3. else an error that names the budget and the smallest estimate.

Truncated reverse and the implicit methods compute another quantity (an approximation of the
hypergradient), so auto never picks them: that is the user's call.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .forward import forward
from .problem import Flat, Init, InnerProblem, RandomState, SavedTensors, leaf_dict, leaves
from .reverse import ActivationStore, reverse

MAX_FORWARD_HPARAMS = 16
BACKWARD_WORK = 1.5  # step graphs' worth of gradients a backward pass through a step holds
FORWARD_GRAPHS = (2.5, 6.0)  # step graphs' worth forward mode holds: per m+1 vectorized, in turn
ALLOCATOR_FACTOR = 1.5  # what a process holds per byte its tensors need (module docstring)
SAVED_TENSOR_OVERHEAD = 2048  # bytes a kept step holds per saved tensor beyond its data
BUDGET_FRACTION = 0.5  # of the memory free now, when no memory_budget is given
FALLBACK_BUDGET = 2 * 2**30  # bytes, where free memory cannot be read (not Linux, not CUDA)
RUNNERS = {"reverse": reverse, "forward": forward}


def auto(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    memory_budget: float | None = None,
):
    """The fastest exact method whose memory fits memory_budget bytes (default: half the free).

    Args:
        memory_budget: bytes the method may hold on top of what is allocated when it starts;
            None: half the memory free now (CUDA: torch.cuda.mem_get_info plus PyTorch's unused
            cache; CPU: MemAvailable of /proc/meminfo, capped by the cgroup's limit; else 2 GiB).
    Returns:
        The chosen method's solution; its info["auto"] is the decision (see `choose`).
    """
    decision = choose(problem, init, hparams, steps, memory_budget=memory_budget)
    solution = RUNNERS[decision["method"]](problem, init, hparams, steps, **decision["options"])
    solution.info = {**solution.info, "auto": copy.deepcopy(decision)}
    return solution


@dataclass(frozen=True)
class Sizes:
    """What the choice is made from (bytes, or counts)."""

    step_graph: int  # bytes of the tensors one more differentiated step saves
    saved_tensors: int  # how many tensors it saves (each costs SAVED_TENSOR_OVERHEAD more)
    activations: int  # a: bytes one step's graph of the objective alone keeps, overhead included
    state: int  # s: bytes of the inner state (parameters and optimiser slots)
    random_state: int  # r: bytes of the generator states stored with each segment start
    hparams: int  # m: scalar hyperparameters
    itemsize: int  # bytes of one hyperparameter element (the tangents' basis)
    steps: int  # T

    @property
    def per_step(self) -> int:
        """g: the bytes one differentiated step adds to a kept graph."""
        return self.step_graph + self.saved_tensors * SAVED_TENSOR_OVERHEAD


def choose(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    memory_budget: float | None = None,
) -> dict:
    """Measure the problem and pick a method; raise if no exact method fits the budget.

    Returns:
        The decision: method and options (to run), reason, memory_budget and budget_source,
        estimates (bytes, allocator factor included) of graph, trajectory, checkpoint (at
        checkpoint_every), forward and forward-loop, the measured sizes and allocator_factor.
    """
    budget_given = _budget_argument(memory_budget)
    sizes = measure(problem, init, hparams, steps)
    device = _device(problem, init, hparams)
    if budget_given is None:
        budget, source = default_budget(device)
    else:
        budget, source = budget_given, "given"
    reverse_bytes = ALLOCATOR_FACTOR * segment_bytes(sizes, np.arange(1, steps + 1))
    activations = ALLOCATOR_FACTOR * activation_bytes(sizes)
    fits = np.flatnonzero(reverse_bytes <= budget)
    every = int(fits[-1]) + 1 if fits.size else int(np.argmin(reverse_bytes)) + 1
    estimates = {
        "graph": float(reverse_bytes[-1]),
        "trajectory": float(reverse_bytes[0]),
        "checkpoint": float(reverse_bytes[every - 1]),
        "activations": float(activations),
        "forward": ALLOCATOR_FACTOR * forward_bytes(sizes, vectorize=True),
        "forward-loop": ALLOCATOR_FACTOR * forward_bytes(sizes, vectorize=False),
    }
    method, options, reason = _pick(sizes, estimates, every, fits.size > 0, budget, init)
    return {
        "method": method,
        "options": options,
        "reason": reason,
        "memory_budget": budget,
        "budget_source": source,
        "estimates": estimates,
        "checkpoint_every": every,
        "sizes": asdict(sizes),
        "allocator_factor": ALLOCATOR_FACTOR,
    }


def _pick(sizes: Sizes, estimates, every: int, reverse_fits: bool, budget: float, init):
    """(method, options, reason) by the module's rule, or the error that nothing fits."""
    T, m = sizes.steps, sizes.hparams
    reverse_options = _reverse_options(every, T)
    if reverse_fits and every == T:
        return "reverse", reverse_options, f"the whole graph fits: {_mib(estimates['graph'])}"
    if estimates["activations"] <= budget and T > 1:
        reason = (
            f"the whole graph ({_mib(estimates['graph'])}) exceeds the budget; each step's "
            f"activations fit ({_mib(estimates['activations'])}), replaying no objective"
        )
        return "reverse", {"memory": "activations"}, reason
    if reverse_fits:
        reason = (
            f"the whole graph ({_mib(estimates['graph'])}) exceeds the budget; the longest "
            f"segments that fit are of {every} step(s) ({_mib(estimates['checkpoint'])}), "
            f"replaying {(T - 1) // every * every} of {T} steps"
        )
        return "reverse", reverse_options, reason
    smallest = f"reverse({_format(reverse_options)}) at {_mib(estimates['checkpoint'])}"
    refusal = _forward_refused(m, init)
    for vectorize, name in ((True, "forward"), (False, "forward-loop")):
        if refusal is None and estimates[name] <= budget:
            reason = (
                f"no reverse policy fits (the smallest is {smallest}); forward mode's memory "
                f"does not grow with T: {_mib(estimates[name])} for m={m} hyperparameters"
            )
            return "forward", {"vectorize": vectorize}, reason
    if refusal is None:
        forward_note = (
            f"forward mode needs {_mib(min(estimates['forward'], estimates['forward-loop']))}"
        )
    else:
        forward_note = f"forward mode is not an option ({refusal})"
    raise ValueError(
        f"method='auto': no exact method fits memory_budget={_mib(budget)}: the smallest "
        f"reverse-mode estimate is {smallest}, and {forward_note}. Raise memory_budget, or "
        "choose an approximate method yourself (method='truncated' with a window k, or an "
        "implicit method)"
    )


def _reverse_options(every: int, steps: int) -> dict:
    if every == steps:
        return {"memory": "graph"}
    if every == 1:
        return {"memory": "trajectory"}
    return {"memory": "checkpoint", "checkpoint_every": every}


def _format(options: Mapping) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _forward_refused(m: int, init: Init) -> str | None:
    if m == 0:
        return "no hyperparameters"
    if m > MAX_FORWARD_HPARAMS:
        return (
            f"m={m} scalar hyperparameters, over {MAX_FORWARD_HPARAMS}: it would take about "
            f"{2 * (m + 1)}x the inner training; pass method='forward' to run it anyway"
        )
    if not callable(init) and any(v.requires_grad for v in init.values()):
        return "w_0 requires grad, and forward mode gives no gradient for w_0"
    return None


def segment_bytes(sizes: Sizes, every):
    """Reverse mode's estimate for segments of `every` steps (an int or an array of them)."""
    stored = (sizes.steps - 1) // every  # segment starts kept, the last segment's excepted
    kept = (every + 1 + BACKWARD_WORK) * sizes.per_step
    return stored * (sizes.state + sizes.random_state) + kept


def activation_bytes(sizes: Sizes) -> float:
    """memory="activations"'s estimate: each step's state and objective graph kept, and one
    step's whole graph with the backward pass's work through it."""
    return float(
        (sizes.steps - 1) * (sizes.state + sizes.activations) + (1 + BACKWARD_WORK) * sizes.per_step
    )


def forward_bytes(sizes: Sizes, vectorize: bool) -> float:
    """Forward mode's estimate: tangents, the basis, and one step's graphs."""
    m, g = sizes.hparams, sizes.per_step
    per_hparam, in_turn = FORWARD_GRAPHS
    graphs = per_hparam * (m + 1) * g if vectorize else in_turn * g
    return float(2 * m * sizes.state + m * m * sizes.itemsize + graphs)


# -- measuring -------------------------------------------------------------------------------
def measure(problem: InnerProblem, init: Init, hparams: Mapping[str, Tensor], steps: int):
    """The sizes of the problem at w_0 (two inner steps with their graphs, which draw nothing
    from the random generators: they are restored after)."""
    lam = leaf_dict(hparams)
    fixed = [] if callable(init) else list(init.values())
    with RandomState.capture([*fixed, *lam.values()]).restored():
        with torch.no_grad():
            z0 = problem.start(init, lam)
        step_graph, saved_tensors = step_graph_bytes(problem, z0, lam)
        activations = objective_graph_bytes(problem, z0, lam)
        random = RandomState.capture(z0)
    values = list(lam.values())
    return Sizes(
        step_graph=step_graph,
        saved_tensors=saved_tensors,
        activations=activations,
        state=sum(_nbytes(v) for v in z0),
        random_state=_nbytes(random.cpu) + sum(_nbytes(state) for _, state in random.cuda),
        hparams=sum(v.numel() for v in values),
        itemsize=values[0].element_size() if values else 0,
        steps=steps,
    )


def step_graph_bytes(problem: InnerProblem, z0: Flat, lam: Mapping[str, Tensor]):
    """(bytes, count) of the tensors that one more differentiated step saves in a graph kept
    from z0 (see the module): the count includes those whose storage persists (data).

    Both steps use t=1 (any T has it); a batch chosen by t is copied per step or a view of
    data that persists, and either is counted as it would be at any t.
    """
    first, second = SavedTensors(), SavedTensors()
    with first.recording():
        z1 = problem.step(leaves(z0), lam, 1)[0]  # the loss is dropped, as in a run
    with second.recording():
        z2 = problem.step(z1, lam, 1)[0]
    # both graphs are alive (z2 holds them), so no two storages counted here share an address
    added, count = second.bytes_not_in(first), len(second)
    del z1, z2
    return added, count


def objective_graph_bytes(problem: InnerProblem, z0: Flat, lam: Mapping[str, Tensor]) -> int:
    """a: the bytes one step keeps under memory="activations" (its objective's graph), with
    SAVED_TENSOR_OVERHEAD per saved tensor, from two steps taken as that policy takes them."""
    store = ActivationStore(2)
    z1 = problem.step_keeping(leaves(z0), lam, 1, store)[0]
    problem.step_keeping(z1, lam, 1, store)
    return store.bytes_per_step() + len(store.saved[1]) * SAVED_TENSOR_OVERHEAD


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _device(problem: InnerProblem, init: Init, hparams: Mapping[str, Tensor]) -> torch.device:
    some = next(iter(hparams.values()), None)
    if some is None and not callable(init):
        some = init[problem.keys[0]]
    return some.device if some is not None else torch.device("cpu")


# -- the budget ------------------------------------------------------------------------------
def _budget_argument(value) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            "memory_budget must be a number of bytes > 0 (or None: half the memory free now), "
            f"got {value!r}"
        )
    return float(value)


def default_budget(device: torch.device) -> tuple[float, str]:
    """(bytes, where they come from): BUDGET_FRACTION of the memory free on `device`."""
    available, source = available_memory(device)
    if available is None:
        return float(FALLBACK_BUDGET), "a fixed 2 GiB (the free memory cannot be read here)"
    return BUDGET_FRACTION * available, f"half of {source}"


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes free for new tensors on `device`, where that was read), or (None, '')."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"the free memory of {device} and PyTorch's unused cache"
    if device.type != "cpu":
        return None, ""
    found = [
        (value, source)
        for value, source in (_meminfo_available(), _cgroup_headroom())
        if value is not None
    ]
    return min(found) if found else (None, "")


def _meminfo_available() -> tuple[int | None, str]:
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable" and rest.split()[1:] == ["kB"]:
            return int(rest.split()[0]) * 1024, "MemAvailable in /proc/meminfo"
    return None, ""


def _cgroup_headroom() -> tuple[int | None, str]:
    """The limit of this container's memory cgroup less its usage (v2, then v1), if any."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, usage = _read(limit_file).strip(), _read(usage_file).strip()
        if limit.isdigit() and usage.isdigit():
            return max(int(limit) - int(usage), 0), f"the memory cgroup's headroom ({limit_file})"
    return None, ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"
