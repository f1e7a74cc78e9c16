"""Where data sets live, and how their files are verified and fetched.

Every file a data set needs is pinned by its sha256. A file that is present is always checked
before use and never silently replaced; a missing file is downloaded from a list of mirrors,
resuming a partial download where the server allows it. Only the standard library is used, so
fetching works wherever the library installs.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from bilevel import BilevelError

__all__ = [
    "DataError",
    "absent_root",
    "cache_root",
    "data_root",
    "download",
    "ensure_file",
    "fetch_missing",
    "missing_root",
    "require_files",
    "sha256_file",
]

DATA_ENV = "BILEVEL_DATA"
CACHE_ENV = "BILEVEL_CACHE"
OFFLINE_ENV = "BILEVEL_OFFLINE"
USER_AGENT = "bilevel-data/0.1 (+python urllib)"
_CHUNK = 1 << 20

Progress = Callable[[int, "int | None"], None]  # (bytes done, total or None)


class DataError(BilevelError):
    """A data file is missing, corrupt, or could not be fetched; the message says what to do."""


def _user_cache_dir() -> Path:
    # platformdirs would do the same; this avoids a dependency for three lines.
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "bilevel" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "bilevel"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bilevel"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the raw data sets: the argument, else $BILEVEL_DATA, else the user cache.

    Each data set uses a subdirectory of it (``mnist/``, ...). The directory may be read-only
    when the files are already there.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else _user_cache_dir()


def missing_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data root when it was chosen (``data_dir``, else $BILEVEL_DATA) and does not exist.

    Only the default root, the user cache, is created when a download needs it: a mistyped
    directory must be an error that names it, not a new empty directory filled by downloads.
    """
    if data_dir is None and not os.environ.get(DATA_ENV):
        return None
    root = data_root(data_dir)
    return None if root.is_dir() else root


def absent_root(root: Path) -> str:
    """What to say of a chosen data root that does not exist (see :func:`missing_root`)."""
    return (
        f"data directory {root} does not exist (--data-dir, or ${DATA_ENV}; only the user "
        "cache, the default, is created)"
    )


def require_files(
    dataset: str,
    directory: Path,
    names: Sequence[str],
    source: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> list[str]:
    """The files of ``names`` that ``directory`` lacks, to be downloaded into it.

    Raises :class:`DataError`, one line naming every missing file and ``source`` (where they
    come from), when they cannot be downloaded: the chosen data root does not exist (see
    :func:`missing_root`), ``download`` is false, or ``BILEVEL_OFFLINE`` is set.
    """
    missing = [name for name in names if not (Path(directory) / name).is_file()]
    root = missing_root(data_dir)
    disabled = "BILEVEL_OFFLINE is set" if _offline() else None if download else "download=False"
    if not missing or (root is None and disabled is None):
        return missing
    message = f"{dataset}: {missing[0]} is missing"
    if disabled is not None:
        message += f" and downloading is disabled ({disabled})"
    if len(missing) > 1:
        message += f"; so {'is' if len(missing) == 2 else 'are'} {', '.join(missing[1:])}"
    message += f"; {source}, and save them in {directory}"
    raise DataError(message if root is None else f"{absent_root(root)}: {message}")


def fetch_missing(missing: Sequence[str], fetch: Callable[[str], object]) -> None:
    """``fetch(name)`` for each missing file; a failure also names the files not fetched yet."""
    for index, name in enumerate(missing):
        try:
            fetch(name)
        except DataError as error:
            later = missing[index + 1 :]
            if not later:
                raise
            raise DataError(f"{error}; also missing: {', '.join(later)}") from None


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def cache_root() -> Path:
    """Writable directory for derived caches (decoded arrays): $BILEVEL_CACHE, else the user cache.

    Kept apart from :func:`data_root` because a shared data directory is often read-only.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else _user_cache_dir()


def sha256_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in chunks so memory stays flat for large files."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(resp: http.client.HTTPResponse, offset: int) -> int:
    """Offset the body starts at: ``offset`` on 206, 0 when the server ignored the Range."""
    if resp.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != offset:
        raise DataError(
            f"server answered a range request for byte {offset} with an unusable "
            f"Content-Range {resp.headers.get('Content-Range')!r}"
        )
    return offset


def _fetch(url: str, part: Path, timeout: float, progress: Progress | None) -> None:
    """Fetch ``url`` into ``part``, appending to what is already there when the server allows.

    A short body (connection dropped) raises but keeps the part file, so the next attempt resumes.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left past `offset`: the part may be complete
            err.close()
            return
        raise
    with resp:
        start = _resume_offset(resp, offset)
        length = resp.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = None if remaining is None else start + remaining
        done = start
        # Append after a granted range; otherwise the body is the whole file: start afresh.
        with open(part, "ab" if start else "wb") as f:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    # urllib returns b"" rather than raising when the peer closes early, so check the count.
    if total is not None and done < total:
        raise DataError(f"connection closed after {done} of {total} bytes")


def _attempt(
    url: str, part: Path, sha256: str | None, timeout: float, progress: Progress | None
) -> str | None:
    """One try at one mirror: None when ``part`` now holds the verified file, else why not."""
    try:
        _fetch(url, part, timeout, progress)
    except (OSError, http.client.HTTPException, DataError) as err:
        return _describe(err)  # the part file stays, to be resumed
    actual = sha256_file(part)
    if sha256 is None or actual == sha256:  # None: the caller records the digest it got
        return None
    part.unlink()  # a wrong file cannot be resumed into a right one
    return f"sha256 mismatch (got {actual})"


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason  # e.g. ConnectionRefusedError inside the URLError wrapper
    return f"{type(err).__name__}: {err}"


def _manual_hint(dest: Path, sha256: str, urls: Sequence[str]) -> str:
    where = urls[0] if urls else dest.name
    expected = f" (expected sha256 {sha256})" if sha256 else ""
    return f"to install it by hand, download {where}, save it as {dest}{expected}"


def download(
    urls: Sequence[str],
    dest: str | os.PathLike,
    sha256: str | None,
    *,
    progress: Progress | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download a file from the first mirror that delivers it with the expected sha256.

    Bytes go to ``<dest>.part`` and reach ``dest`` only through an atomic rename after the
    checksum matched (``sha256=None``: any complete file, for a caller that records the digest
    it got because none is published), so ``dest`` is never partial. An interrupted transfer
    leaves the part file to be resumed with an HTTP Range request (from zero if the server
    ignores ranges); a checksum mismatch deletes it. ``progress(done, total)`` is called after
    each chunk (``total`` is None when the server does not say). Raises :class:`DataError`
    listing every mirror's failure when none succeeds.
    """
    dest = Path(dest)
    if _offline():
        raise DataError(
            f"{dest.name} is missing and downloading is disabled (BILEVEL_OFFLINE is set); "
            + _manual_hint(dest, sha256, urls)
        )
    part = _part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        resumed = part.exists()
        failure = _attempt(url, part, sha256, timeout, progress)
        if failure and resumed and not part.exists():
            # The mismatch may come from stale bytes of an earlier attempt: once more from zero.
            failure = _attempt(url, part, sha256, timeout, progress)
        if failure is None:
            os.replace(part, dest)
            return dest
        failures.append(f"{url} ({failure})")
    tried = ", ".join(failures) if failures else "no mirrors given"
    # one line: a command line prints it as its single error line
    hint = _manual_hint(dest, sha256, urls)
    raise DataError(f"could not download {dest.name}; tried {tried}; {hint}")


_download = download  # `ensure_file` has a parameter named `download`


def ensure_file(
    name: str,
    directory: str | os.PathLike,
    sha256: str,
    urls: Sequence[str],
    download: bool = True,
    **download_kwargs,
) -> Path:
    """Path of ``directory/name`` after checking its sha256, downloading it first if absent.

    A present file with the wrong checksum raises :class:`DataError` and is left alone: it may be
    the user's, and silently replacing or using it would hide the problem. Setting the
    environment variable ``BILEVEL_OFFLINE=1`` disables downloads (air-gapped machines, tests).
    """
    path = Path(directory) / name
    if path.is_file():
        actual = sha256_file(path)
        if actual != sha256:
            raise DataError(
                f"{path} is corrupt: sha256 {actual}, expected {sha256}. "
                "Delete it to download it again, or replace it with a good copy."
            )
        return path
    if not download:
        raise DataError(
            f"{name} is missing and downloading is disabled; " + _manual_hint(path, sha256, urls)
        )
    return _download(urls, path, sha256, **download_kwargs)
