"""Training checkpoints that are written whole and checked when read.

A file is one header line of JSON (the sha256 and size of the payload, a hash of the
configuration that produced it, and that configuration), then the payload: a ``torch.save``
of the state dict. It is written to a temporary name and renamed over the old file, so a crash
leaves the previous checkpoint intact; on load a truncated or altered payload fails its sha256
and a checkpoint of another configuration is refused, naming the settings that differ.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from bilevel import BilevelError

from .files import atomic_write

__all__ = [
    "AUTO_RESUME",
    "BEST",
    "CHECKPOINT",
    "CheckpointError",
    "auto_resume",
    "config_hash",
    "load",
    "restarted",
    "save",
]

MAGIC = b"bilevel-checkpoint v1\n"
CHECKPOINT = "checkpoint.pt"  # what a run continues from
BEST = "best.pt"  # the network of a run's best validation, which a test reads
AUTO_RESUME = "BILEVEL_RESUME"  # =auto: a run resumes from its output directory's checkpoint


class CheckpointError(BilevelError, RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated, or from another configuration."""


def config_hash(config: Mapping) -> str:
    """A short, stable hash of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(path: str | Path, state: Mapping, config: Mapping) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    header = {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
        "config_hash": config_hash(config),
        "config": dict(config),
    }
    atomic_write(Path(path), MAGIC + json.dumps(header, default=str).encode() + b"\n" + payload)


def load(path: str | Path, config: Mapping | None = None, map_location="cpu") -> dict:
    """The state saved at ``path``, after checking its payload (and, given ``config``, that it
    was written under the same configuration); raises CheckpointError otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({error.strerror})") from None
    header, payload = _split(path, data)
    if len(payload) != header["bytes"] or hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its payload does not match the sha256 it was saved "
            f"with ({len(payload)} of {header['bytes']} bytes)"
        )
    if config is not None and config_hash(config) != header["config_hash"]:
        raise CheckpointError(f"checkpoint {path} {_difference(header.get('config', {}), config)}")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def _split(path: Path, data: bytes) -> tuple[dict, bytes]:
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a bilevel checkpoint (or its header is damaged)")
    line, newline, payload = data[len(MAGIC) :].partition(b"\n")
    try:
        header = json.loads(line) if newline else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or not {"sha256", "bytes", "config_hash"} <= set(header):
        raise CheckpointError(f"checkpoint {path} is corrupt: its header is damaged")
    return header, payload


def _difference(saved: Mapping, config: Mapping) -> str:
    here = json.loads(json.dumps(dict(config), default=str))  # as the header holds it
    keys = sorted(k for k in set(saved) | set(here) if saved.get(k, ...) != here.get(k, ...))
    unset = "(not a setting)"
    shown = ", ".join(
        f"{k}={saved.get(k, unset)!r} there, {here.get(k, unset)!r} here" for k in keys[:5]
    )
    return f"was written with another configuration: {shown or 'the hashes differ'}"


def auto_resume() -> bool:
    """Whether a run resumes from its checkpoint without --resume: ``BILEVEL_RESUME=auto``, or
    a worker that torchrun restarted (``--max-restarts``) after a failure."""
    if os.environ.get(AUTO_RESUME, "").lower() in ("auto", "1", "true", "yes"):
        return True
    return restarted()


def restarted() -> bool:
    """Whether this process is a worker that torchrun restarted after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
