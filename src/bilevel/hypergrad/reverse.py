"""Reverse mode (RMD): back-propagation through the T inner steps.

One algorithm serves every memory policy. The differentiated window of steps is
cut into segments; only each segment's start state is stored on the way
forward, and on the way back each segment is replayed with its graph from that
start and back-propagated with the incoming adjoint. The last segment keeps the
graph it was built with, so it is never replayed.

    memory="graph"        one segment: the whole graph is kept (fastest)
    memory="trajectory"   segments of one step: T states stored, no graph kept
    memory="checkpoint"   segments of ~sqrt(T) steps: O(sqrt(T)) states + one segment's graph
    memory="activations"  segments of one step, each keeping the graph of its objective (its
                          activations) but not that of its gradient and update: on the way
                          back dL/dw and the update are rebuilt from it, the objective is not
                          evaluated again (between graph and trajectory in time and memory)

Truncation (Shaban et al.) is a window: only the last K steps are
differentiated; the earlier ones run without any graph and w_{T-K} is treated
as a constant.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import validate
from ..errors import HypergradientWarning
from .problem import (
    Flat,
    Init,
    InnerProblem,
    RandomState,
    SavedTensors,
    leaves,
    storage_key,
    vjp,
)

MEMORY_POLICIES = ("graph", "trajectory", "checkpoint", "activations")


def reverse(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    memory: str = "graph",
    checkpoint_every: int | None = None,
    window: int | None = None,
) -> ReverseSolution:
    """Run the inner steps, storing what `memory` asks, and return a solution to pull back."""
    if memory not in MEMORY_POLICIES:
        raise ValueError(f"memory must be one of {MEMORY_POLICIES}, got {memory!r}")
    if checkpoint_every is not None and memory != "checkpoint":
        raise ValueError(f"checkpoint_every applies to memory='checkpoint', not {memory!r}")
    window = steps if window is None else validate.positive_int("window", window)
    if window > steps:
        raise ValueError(f"the window (k) must be at most steps={steps}, got {window}")
    length = _segment_length(memory, window, checkpoint_every)

    initial_random = RandomState.capture(tuple(hparams.values()))  # Phi_0 may draw
    z = problem.start(init, hparams)
    first = steps - window + 1
    z = problem.run(z, hparams, 1, first - 1)  # outside the window: no graph at all
    last = first + (window - 1) // length * length  # first step of the last segment
    if memory == "activations":
        starts = ActivationStore(last - first)
        z = problem.run(z, hparams, first, last - first, kept=starts)
    else:
        starts = StateStore(z, (last - first) // length)
        z = problem.run(z, hparams, first, last - first, checkpoints=starts, every=length)
    z_last = leaves(z)
    z_end = problem.run(z_last, hparams, last, steps - last + 1, graph=True)
    solution = ReverseSolution(
        problem, init, hparams, starts, length, (last, z_last, z_end), full=window == steps
    )
    solution.initial_random = initial_random
    if isinstance(starts, ActivationStore) and starts.bytes_per_step() is not None:
        # what the kept graphs hold: the memory this policy spends to save time
        solution.info["activation_bytes"] = starts.bytes_per_step() * len(starts)
    return solution


class StateStore:
    """Segment start states in buffers allocated once, [count, *shape] per state tensor.

    One allocation instead of one per stored step: interleaved with each step's short-lived
    temporaries, many small allocations fragment the heap so that freed memory is never
    returned, and the process grows several times faster than the states it keeps.
    """

    def __init__(self, like: Flat, count: int):
        self.buffers = rows_like(like, count)
        self.steps: list[int] = []
        generator = torch.get_rng_state()  # the CPU generator's states: one buffer too
        self.cpu_random = generator.new_empty((count, *generator.shape))
        self.cuda_random: list[tuple] = []

    def append(self, entry: tuple[int, Flat, RandomState]) -> None:
        t, z, random = entry
        for buffer, v in zip(self.buffers, z):
            buffer[len(self.steps)].copy_(v)
        self.cpu_random[len(self.steps)].copy_(random.cpu)
        self.cuda_random.append(random.cuda)
        self.steps.append(t)

    def __len__(self) -> int:
        return len(self.steps)

    def replays(self, problem: InnerProblem, hparams, length: int):
        """(segment start as leaves, its end with the graph), last segment first: each
        replayed from its stored start under the random state it first ran with."""
        for j in reversed(range(len(self.steps))):
            # a copy: set_rng_state reads a whole tensor, not a row of a buffer
            random = RandomState(self.cpu_random[j].clone(), self.cuda_random[j])
            z_start = leaves(tuple(buffer[j] for buffer in self.buffers))
            with random.restored():  # the same dropout masks as on the way forward
                z_end = problem.run(
                    z_start, hparams, self.steps[j], length, graph=True, check=False
                )
            yield z_start, z_end


def rows_like(like: Flat, count: int) -> list[Tensor]:
    """One buffer [count, *shape] per state tensor: `count` states in one allocation each."""
    return [v.new_empty((count, *v.shape)) for v in like]


class ActivationStore:
    """Each step's start state and the graph of its objective (`InnerProblem.step_keeping`).

    Random draws need no replay: the objective is not evaluated again, its graph holds the
    masks it drew. `bytes_per_step()` is what one step's graph keeps: the tensors autograd
    saved in the second step that it had not saved in the first (so neither the data, saved
    by both, nor the states, rows of one buffer, are counted).

    The states live in buffers allocated once (`place`), and from the third of `count` steps
    on, what a step saves anew is copied into its row of one more buffer (`Arena`), the
    originals freed with the step's temporaries: kept blocks interleaved with freed ones
    fragment glibc's heap, and the process grew by 700 KB a step for 270 KB kept (W1), more
    than the whole graph's 520 KB.
    """

    def __init__(self, count: int):
        self.count = count
        self.states: list[Tensor] = []  # [count, *shape] per state tensor
        self.kept: list[tuple[int, Flat, Tensor]] = []
        self.saved: list[SavedTensors] = []  # for the first two steps
        self.arena: Arena | None = None

    def append(self, entry: tuple[int, Flat, Tensor]) -> None:
        self.kept.append(entry)

    def __len__(self) -> int:
        return len(self.kept)

    def place(self, z: Flat) -> Flat:
        """The step's start state as leaves in its row of buffers allocated once (as the
        trajectory's states: small kept copies would fragment the heap as well)."""
        if not self.states:
            self.states = rows_like(z, self.count)
        row = len(self.kept)
        for buffer, v in zip(self.states, z):
            buffer[row].copy_(v)
        return leaves(tuple(buffer[row] for buffer in self.states))

    def watching(self):
        """The context a step's objective and gradient run in: recording what autograd saves
        (the first two steps), then copying it into the arena."""
        step = len(self.kept)
        if step < 2:
            self.saved.append(SavedTensors())
            return self.saved[-1].recording()
        if step == 2:
            self.arena = Arena.fitting(*self.saved, rows=self.count - 2)
        if self.arena is None:
            return contextlib.nullcontext()
        return self.arena.filling(step - 2)

    def bytes_per_step(self) -> int | None:
        """Measured while the first two steps' graphs are alive (None with fewer steps)."""
        return self.saved[1].bytes_not_in(self.saved[0]) if len(self.saved) == 2 else None

    def replays(self, problem: InnerProblem, hparams, length: int):
        self.saved = []  # no more measuring: free the records with the graphs
        while self.kept:  # popped: each step's graph is freed once pulled back through
            t, z_start, loss = self.kept.pop()
            yield z_start, problem.step_kept(z_start, loss, hparams, t)


class Arena:
    """One buffer of `rows` rows, each holding what one step saves anew (its activations),
    laid out as the second step saved them. A tensor that does not fit its row (a step that
    saves more, or other shapes) is kept as autograd made it."""

    ALIGN = 64  # bytes: every dtype's view of a row may start at any slot

    def __init__(self, persistent: set, row_bytes: int, rows: int, device: torch.device):
        self.persistent, self.row_bytes = persistent, row_bytes
        self.buffer = torch.empty((rows, row_bytes), dtype=torch.uint8, device=device)

    @classmethod
    def fitting(cls, first: SavedTensors, second: SavedTensors, rows: int) -> Arena | None:
        """An arena for what `second` saved that `first` did not (None: nothing to place)."""
        persistent = set(first.storages())
        fresh = [t for t in second.tensors() if storage_key(t) not in persistent]
        if rows < 1 or not fresh or len({t.device for t in fresh}) > 1:
            return None
        row_bytes = sum(_slot(t) for t in {_identity(t): t for t in fresh}.values())
        return cls(persistent, row_bytes, rows, fresh[0].device)

    @contextlib.contextmanager
    def filling(self, row: int):
        """Saved-tensor hooks that copy the step's new tensors into `row`."""
        # a tensor saved twice is copied once; the originals are held until the step ends, so
        # that no other tensor of the step takes the address of one whose copy is in `slots`
        slots: dict[tuple, tuple[Tensor, Tensor]] = {}
        offset = 0

        def pack(tensor: Tensor) -> Tensor:
            nonlocal offset
            if (tensor.is_leaf and tensor.requires_grad) or storage_key(tensor) in self.persistent:
                return tensor  # a state or hyperparameter leaf, or data
            identity = _identity(tensor)
            if identity in slots:
                return slots[identity][1]
            size = _slot(tensor)
            if offset + size > self.row_bytes or tensor.device != self.buffer.device:
                return tensor
            place = self.buffer[row, offset : offset + tensor.numel() * tensor.element_size()]
            copy = place.view(tensor.dtype).view(tensor.shape).copy_(tensor)
            slots[identity], offset = (tensor, copy), offset + size
            return copy

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpacked):
            yield
        slots.clear()  # the graph keeps `pack` alive: it must not keep the originals


def _unpacked(tensor: Tensor) -> Tensor:
    return tensor


def _identity(tensor: Tensor) -> tuple:
    return (storage_key(tensor), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())


def _slot(tensor: Tensor) -> int:
    size = tensor.numel() * tensor.element_size()
    return -(-size // Arena.ALIGN) * Arena.ALIGN


class ReverseSolution:
    """w_T, and the backward pass over the stored segments."""

    def __init__(self, problem, init, hparams, starts, length, last_segment, full):
        self.problem, self.init, self.hparams = problem, init, hparams
        self.starts, self.length, self.last_segment, self.full = starts, length, last_segment, full
        self.params = problem.params_of(tuple(v.detach() for v in last_segment[2]))
        self.info: dict = {}

    def vjp(self, adjoint: Mapping[str, Tensor], initial: bool = False):
        """Pull a cotangent on w_T back to the hparams, and to w_0 if `initial` (else None).

        The cotangent on w_0 is computed only when asked for or needed (a learned
        initialisation): it costs one more pull through the first step.
        """
        if self.last_segment is None:
            raise RuntimeError(
                "a reverse-mode solution is pulled back once: its graph is freed by the first "
                "vjp (run the method again for another cotangent)"
            )
        problem, hparams = self.problem, self.hparams
        lam = list(hparams.values())
        learned = callable(self.init)
        need_start = self.full and (initial or learned)
        _, z_start, z_end = self.last_segment
        self.last_segment = None  # its graph is freed by this pass
        count = len(self.starts) + 1
        segments = itertools.chain(
            [(z_start, z_end)], self.starts.replays(problem, hparams, self.length)
        )
        alpha, total = problem.adjoint(adjoint, z_end), [torch.zeros_like(v) for v in lam]
        for i, (z_start, z_end) in enumerate(segments):
            earliest = i == count - 1
            inputs = lam if earliest and not need_start else list(z_start) + lam
            grads = vjp(z_end, inputs, alpha)
            alpha = grads[: len(inputs) - len(lam)]
            total = [a + b for a, b in zip(total, grads[len(inputs) - len(lam) :])]
        grads = dict(zip(hparams, total))
        if not need_start:
            return grads, None
        alpha_w0 = problem.params_of(alpha)
        if learned:  # w_0 = Phi_0(lambda): continue into Phi_0
            # the draws w_0 was made with (a random Phi_0); backward runs without grad
            with self.initial_random.restored(), torch.enable_grad():
                w0 = self.init(hparams)
            extra = vjp([w0[k] for k in problem.keys], lam, [alpha_w0[k] for k in problem.keys])
            grads = {k: g + e for (k, g), e in zip(grads.items(), extra)}
        return grads, alpha_w0 if initial else None


def _segment_length(memory: str, window: int, checkpoint_every: int | None) -> int:
    if memory == "graph":
        return window
    if memory in ("trajectory", "activations"):
        return 1
    if checkpoint_every is None:
        return math.isqrt(window - 1) + 1  # ceil(sqrt(window))
    return validate.positive_int("checkpoint_every", checkpoint_every)


def truncated(
    problem: InnerProblem,
    init: Init,
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    k: int,
    memory: str = "graph",
    checkpoint_every: int | None = None,
) -> ReverseSolution:
    """Reverse mode over the last k steps only (k = steps is plain reverse mode)."""
    validate.positive_int("k", k)
    solution = reverse(
        problem, init, hparams, steps, memory=memory, checkpoint_every=checkpoint_every, window=k
    )
    if callable(init) and k < steps:
        note = (
            f"truncated to the last k={k} of {steps} steps: w_{steps - k} is a constant, so the "
            "learned initialisation params=callable gets no hypergradient through w_0"
        )
        solution.info["note"] = note
        warnings.warn(note, HypergradientWarning, stacklevel=3)
    return solution
