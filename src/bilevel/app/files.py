"""Files written whole: to a temporary name beside the target, then renamed over it.

A reader (or a process resuming after a kill) sees either the old file or the whole new one.
The one writer of the application: run results, checkpoints, plots and the decoded-data caches.
Files get the mode any new file gets (0666 less the umask), so collaborators read what the
umask lets them read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "remove_partial_writes", "umask", "write_atomic"]

PARTIAL = ".*.tmp"  # the temporary names: ".<target name>.<random>.tmp"


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Have ``write(temporary)`` write the file, then rename it over ``path``; returns ``path``.

    The temporary name ends in ``.tmp``, not in the suffix of ``path``: a writer that picks a
    format from the name must be told it (``savefig(..., format="png")``) or given an open file
    (``np.save(handle, ...)``). The file is flushed to disk before the rename, and a failed
    write leaves no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~umask())  # mkstemp makes it 0600, whatever the umask
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` whole; returns ``path``."""
    payload = data.encode() if isinstance(data, str) else data
    return write_atomic(path, lambda temporary: temporary.write_bytes(payload))


def remove_partial_writes(directory: str | os.PathLike) -> None:
    """Delete the temporary files that writers killed mid-write left in ``directory`` (the
    files they were to replace are whole)."""
    for partial in Path(directory).glob(PARTIAL):
        partial.unlink(missing_ok=True)


def umask() -> int:
    """This process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(current)
    return current
