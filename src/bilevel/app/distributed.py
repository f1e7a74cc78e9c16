"""Data-parallel training over processes started by ``torchrun`` (one process per device).

A process learns its place from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it (or with ``WORLD_SIZE=1``) it is
the only process and nothing here communicates. The backend follows the device: NCCL for
CUDA (each process on ``cuda:LOCAL_RANK``), gloo otherwise.

Exactness is the contract: every rank draws the *whole* meta-batch from the same seeded
sampler and keeps its contiguous share (:func:`shard`), computes the mean loss of its share,
and the gradients are averaged (:meth:`Group.average`). With equal shares the average of the
per-share means is the mean over the meta-batch, so N processes take the step one process
would (to the order of float sums). See docs/distributed.md.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Group", "env_rank", "env_world_size", "free_port", "init", "shard"]


def env_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0) if env_world_size() > 1 else 0


def free_port() -> int:
    """A TCP port free on this machine now (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Group:
    """The processes of one run; ``size == 1`` is a single process (no communication)."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"
    owned: bool = False  # whether this module created the process group (and closes it)

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``values`` over the ranks (in place; returned)."""
        if self.size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace every tensor by its mean over the ranks (one flat all-reduce)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def fill(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's non-NaN entries, on every rank: each entry is computed by exactly one
        rank and NaN elsewhere (a shared evaluation split over the ranks)."""
        if self.size == 1:
            return values
        mine = ~torch.isnan(values)
        summed = torch.where(mine, values, torch.zeros_like(values)).to(self.device)
        count = mine.to(summed.dtype).to(self.device)
        dist.all_reduce(summed)
        dist.all_reduce(count)
        if not bool((count == 1).all()):
            raise RuntimeError("fill: every entry must be computed by exactly one rank")
        return summed.to(values.device)

    def any(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is set (a collective: every rank calls it)."""
        if self.size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def first_message(self, mine: str | None) -> str:
        """The first message any rank holds, "" if none (a collective: every rank calls it)."""
        if self.size == 1:
            return mine or ""
        messages: list = [None] * self.size
        dist.all_gather_object(messages, mine)
        rank, message = next(((r, m) for r, m in enumerate(messages) if m), (0, ""))
        if not message or rank == self.rank:
            return message
        return f"on rank {rank}: {message}"

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if self.size == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, value: int, what: str) -> None:
        """Check that every rank holds the same integer ``value`` (e.g. the resumed iteration)."""
        if self.size == 1:
            return
        both = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if both[0] != -both[1]:
            raise RuntimeError(f"the ranks disagree on {what}: {-both[1]:g} to {both[0]:g}")

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False


def init(device: str = "cpu") -> Group:
    """The process group of this run, initialised from torchrun's environment when it has
    more than one process (NCCL on CUDA, gloo otherwise); a single process otherwise."""
    if dist.is_available() and dist.is_initialized():  # set up by the caller (tests, notebooks)
        rank, size, owned = dist.get_rank(), dist.get_world_size(), False
    else:
        size, rank, owned = env_world_size(), env_rank(), False
        if size > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, **_fresh_store(rank, size))
            owned = True
    if size > 1 and torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    return Group(rank, size, device, owned)


def _fresh_store(rank: int, size: int) -> dict:
    """After a torchrun restart (``--max-restarts``), a store namespace of this attempt.

    The workers of every attempt share torchrun's store; the backend's rendezvous keys of the
    killed attempt are still in it, and a restarted worker that starts before its peers can read
    a dead peer's address and fail to connect. A prefix per attempt keeps the attempts apart.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # (without the agent's store, rank 0 hosts a fresh one: nothing stale)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False
    )
    prefixed = dist.PrefixStore(f"bilevel/attempt-{attempt}", store)
    return {"store": prefixed, "rank": rank, "world_size": size}


def shard(tensors: Sequence[torch.Tensor], rank: int, size: int, what: str = "batch") -> list:
    """Rank ``rank``'s contiguous share of each tensor's first axis (equal shares only)."""
    total = tensors[0].shape[0]
    if total % size:
        raise ValueError(f"{what} = {total} does not split evenly over {size} processes")
    share = total // size
    return [t[rank * share : (rank + 1) * share] for t in tensors]
