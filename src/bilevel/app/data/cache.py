"""Decoded-data caches: eviction of stale copies, and a decoding pool (they are written whole
by bilevel.app.files.write_atomic)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def evict_stale(stem: Path, source: str) -> None:
    """Delete the other caches next to ``stem`` built from ``source`` (older versions of the
    same files): without this, every touched data file would leave a full copy behind."""
    prefix = stem.name.rsplit("-", 1)[0]
    for index in stem.parent.glob(f"{prefix}-*.json"):
        if index.name == stem.name + ".json":
            continue
        try:
            if json.loads(index.read_text()).get("source") == source:
                index.with_suffix(".npy").unlink(missing_ok=True)
                index.unlink(missing_ok=True)
        except (OSError, ValueError):  # unreadable, or in use where that blocks deletion
            continue


def resolve_workers(workers: int | None) -> int:
    """``workers``, checked; by default the CPUs this process may run on."""
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        return workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pool_map(fn: Callable, tasks: Sequence, workers: int) -> Iterator:
    """``fn`` over ``tasks``, results in order, on ``workers`` processes when more than one.

    Processes because decoding holds the GIL. Fork where it exists: the workers only touch
    Pillow, numpy and files, and a fresh interpreter would spend seconds importing torch.
    """
    # A daemonic process (a DataLoader worker, say) may not start processes of its own.
    if workers <= 1 or len(tasks) <= 1 or multiprocessing.current_process().daemon:
        yield from map(fn, tasks)
        return
    fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    context = multiprocessing.get_context("fork" if fork else None)
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context)
    try:
        yield from pool.map(fn, tasks)
    finally:
        pool.shutdown(cancel_futures=True)
