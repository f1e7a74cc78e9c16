"""Fetching and verifying data files, against a real HTTP server on 127.0.0.1."""

import hashlib
import os
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bilevel.app.data import store
from bilevel.app.data.store import (
    DataError,
    cache_root,
    data_root,
    download,
    ensure_file,
    sha256_file,
)

PAYLOAD = os.urandom(300_000)  # several chunks once the chunk size is shrunk below
SHA = hashlib.sha256(PAYLOAD).hexdigest()
NAME = "blob.bin"


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.mirror.files``, honouring ``Range: bytes=N-`` unless switched off."""

    def do_GET(self):
        mirror = self.server.mirror
        rng = self.headers.get("Range")
        mirror.requests.append(rng)
        body = mirror.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng and mirror.ranges else 0
        if start >= len(body) > 0:
            mirror.statuses.append(416)  # recorded before replying: the client may return at once
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 206 if start or (rng and mirror.ranges) else 200
        mirror.statuses.append(status)
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if mirror.cut_after is not None:  # one interrupted response, then normal service
            payload, mirror.cut_after = payload[: mirror.cut_after], None
        mirror.sent += len(payload)
        self.wfile.write(payload)  # HTTP/1.0: the connection closes after each response

    def log_message(self, *args):
        pass


class Mirror:
    """A local mirror whose switches simulate what real mirrors do wrong."""

    def __init__(self, files):
        self.files = dict(files)
        self.ranges = True  # False: ignore Range and always answer 200 with the whole file
        self.cut_after = None  # close the next response after this many body bytes
        self.requests, self.statuses, self.sent = [], [], 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.mirror = self
        # A short poll keeps shutdown() (which waits for the poll) from costing 0.5 s per test.
        kwargs = {"poll_interval": 0.01}
        threading.Thread(target=self.server.serve_forever, kwargs=kwargs, daemon=True).start()

    def url(self, name=NAME):
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirrors():
    made = []

    def make(files=None):
        made.append(Mirror({NAME: PAYLOAD} if files is None else files))
        return made[-1]

    yield make
    for m in made:
        m.close()


@pytest.fixture
def refused_url():
    # A port that was just free: nothing listens there, so connecting is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{NAME}"


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(store, "_CHUNK", 64 * 1024)


def _watch_final_name(dest):
    """A progress callback that fails if ``dest`` exists while bytes are still arriving."""
    calls = []

    def progress(done, total):
        assert not dest.exists(), "partial data visible under the final name"
        calls.append((done, total))

    return progress, calls


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path, chunk_size=4096) == SHA


def test_download_verifies_and_renames(mirrors, tmp_path):
    m = mirrors()
    dest = tmp_path / "sub" / NAME
    progress, calls = _watch_final_name(dest)
    assert download([m.url()], dest, SHA, progress=progress) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / (NAME + ".part")).exists()
    assert len(calls) > 1 and calls[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_dead_mirrors_are_skipped(mirrors, refused_url, tmp_path):
    m = mirrors()
    dest = tmp_path / NAME
    download([refused_url, m.url("missing.bin"), m.url()], dest, SHA)
    assert dest.read_bytes() == PAYLOAD


def test_all_mirrors_failing_explains_each_and_the_manual_fix(mirrors, refused_url, tmp_path):
    m = mirrors()
    dest = tmp_path / NAME
    with pytest.raises(DataError) as info:
        download([refused_url, m.url("missing.bin")], dest, SHA)
    msg = str(info.value)
    assert refused_url in msg and "ConnectionRefusedError" in msg
    assert m.url("missing.bin") in msg and "404" in msg
    assert str(dest) in msg and SHA in msg and str(tmp_path) in msg
    assert not dest.exists()


def test_corrupt_first_mirror_falls_back_to_second(mirrors, tmp_path):
    bad = mirrors({NAME: b"x" + PAYLOAD[1:]})
    good = mirrors()
    dest = tmp_path / NAME
    progress, _ = _watch_final_name(dest)
    download([bad.url(), good.url()], dest, SHA, progress=progress)
    assert dest.read_bytes() == PAYLOAD
    assert bad.requests == [None] and good.requests == [None]  # the bad part was not resumed


def test_only_corrupt_mirrors_leave_nothing_behind(mirrors, tmp_path):
    bad = mirrors({NAME: PAYLOAD[::-1]})
    dest = tmp_path / NAME
    with pytest.raises(DataError, match="sha256 mismatch"):
        download([bad.url()], dest, SHA)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_with_range(mirrors, tmp_path):
    m = mirrors()
    half = len(PAYLOAD) // 2
    m.cut_after = half
    dest = tmp_path / NAME
    part = tmp_path / (NAME + ".part")
    progress, _ = _watch_final_name(dest)
    with pytest.raises(DataError, match=f"closed after {half} of {len(PAYLOAD)} bytes"):
        download([m.url()], dest, SHA, progress=progress)
    assert not dest.exists() and part.stat().st_size == half

    download([m.url()], dest, SHA, progress=progress)
    assert m.requests == [None, f"bytes={half}-"] and m.statuses == [200, 206]
    assert m.sent == len(PAYLOAD)  # the second response carried only the rest
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_interrupted_mirror_hands_over_to_next_which_resumes(mirrors, tmp_path):
    first, second = mirrors(), mirrors()
    first.cut_after = 1000
    dest = tmp_path / NAME
    download([first.url(), second.url()], dest, SHA)
    assert second.requests == ["bytes=1000-"]
    assert dest.read_bytes() == PAYLOAD


def test_server_without_range_support_restarts_from_zero(mirrors, tmp_path):
    m = mirrors()
    m.ranges = False
    dest = tmp_path / NAME
    (tmp_path / (NAME + ".part")).write_bytes(PAYLOAD[:1234])
    download([m.url()], dest, SHA)
    assert m.requests == ["bytes=1234-"] and m.statuses == [200]
    assert dest.read_bytes() == PAYLOAD  # overwritten, not appended to


def test_stale_part_is_retried_from_zero(mirrors, tmp_path):
    m = mirrors()
    dest = tmp_path / NAME
    (tmp_path / (NAME + ".part")).write_bytes(b"garbage from an older attempt")
    download([m.url()], dest, SHA)
    assert m.requests == ["bytes=29-", None]
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_verified_and_installed(mirrors, tmp_path):
    # Interrupted between the last byte and the rename: the server has nothing left to send.
    m = mirrors()
    dest = tmp_path / NAME
    (tmp_path / (NAME + ".part")).write_bytes(PAYLOAD)
    download([m.url()], dest, SHA)
    assert m.statuses == [416] and dest.read_bytes() == PAYLOAD


def test_ensure_file_uses_a_good_file_without_network(tmp_path):
    (tmp_path / NAME).write_bytes(PAYLOAD)
    assert ensure_file(NAME, tmp_path, SHA, urls=[]) == tmp_path / NAME


def test_ensure_file_refuses_a_corrupt_file_and_keeps_it(mirrors, tmp_path):
    m = mirrors()
    path = tmp_path / NAME
    path.write_bytes(PAYLOAD[:-1])
    with pytest.raises(DataError) as info:
        ensure_file(NAME, tmp_path, SHA, [m.url()])
    msg = str(info.value)
    assert str(path) in msg and SHA in msg and hashlib.sha256(PAYLOAD[:-1]).hexdigest() in msg
    assert path.read_bytes() == PAYLOAD[:-1] and m.requests == []


def test_ensure_file_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as info:
        ensure_file(NAME, tmp_path / "d", SHA, ["http://127.0.0.1:9/x"], download=False)
    assert str(tmp_path / "d" / NAME) in str(info.value) and SHA in str(info.value)


def test_ensure_file_downloads_when_absent(mirrors, tmp_path):
    m = mirrors()
    path = ensure_file(NAME, tmp_path / "d", SHA, [m.url()])
    assert path == tmp_path / "d" / NAME and path.read_bytes() == PAYLOAD


def test_roots_follow_argument_then_environment_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("BILEVEL_DATA", raising=False)
    monkeypatch.delenv("BILEVEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):  # elsewhere the platform's own cache dir is used
        assert data_root() == cache_root() == tmp_path / "xdg" / "bilevel"
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "data" and cache_root() == tmp_path / "cache"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root("~") == Path.home()
