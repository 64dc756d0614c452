"""Request limits against a real vzd: body caps, header/body/handshake timeouts, the cap on
unauthenticated TLS connections per address, rate limits, and uploads streamed to disk.

One daemon serves the module, with short timeouts and small caps set through its
environment; its TLS listener is on 127.0.0.1. A test that plays an attacker comes from an
address of its own in 127/8 (the kernel routes all of it to loopback), so the per-address
limits it trips do not reach the other tests, and "another client is still served" can be
checked for real. Memory is measured as vzd's VmRSS before and after, with a generous
bound: an unbounded vzd grows by the whole body (hundreds of MiB).
"""

from __future__ import annotations

import contextlib
import io
import json
import select
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon, _cleanup, _make_daemon
from vzkit.errors import VzError
from vzkit.sdk.client import Client
from vzkit.sdk.remotes import Remote

pytestmark = pytest.mark.integration

MiB = 1 << 20
# How far vzd's resident memory may grow while a test floods it.
RSS_BOUND = 100 * MiB
# How much an endless body may send before the test gives up waiting for an answer.
FLOOD = 400 * MiB
# Seconds to wait for what the daemon's limits (2-5 s) should bring about.
DEADLINE = 30.0

LIMITS = {
    "VZ_HEADER_TIMEOUT": "2",
    "VZ_BODY_TIMEOUT": "2",
    # Longer: the test holding connections open must get its next one in before they go.
    "VZ_TLS_HANDSHAKE_TIMEOUT": "5",
    "VZ_MAX_ANON_CONNECTIONS": "4",
    # A call a minute refills in 20-30 s: far longer than the tests' few calls take.
    "VZ_JOIN_RATE": "2",
    "VZ_PROBE_RATE": "3",
    "VZ_MAX_PUSH_SIZE": "1MiB",
    "VZ_MAX_IMPORT_SIZE": "2MiB",
}


@dataclass
class Limited:
    d: Daemon
    address: str
    token: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.d.settings.state_dir / "pki" / "ca.crt"))
        return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def limited(image_cache: Path) -> Iterator[Limited]:
    root = Path(tempfile.mkdtemp(prefix="vzt-"))
    d = _make_daemon(root, image_cache)
    d.env.update(LIMITS)
    try:
        d.start()
        address = f"127.0.0.1:{_free_port()}"
        d.client().set_listen(address)
        token = d.client().add_trust("ci", "token").token
        assert token is not None
        yield Limited(d, address, token)
    finally:
        _cleanup(d)
        shutil.rmtree(root, ignore_errors=True)


# -- raw HTTP over sockets -------------------------------------------------------------------


def _rss(d: Daemon) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _unix(d: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    s.connect(str(d.socket))
    return s


def _tcp(lim: Limited, source: str) -> socket.socket:
    s = socket.socket()
    s.settimeout(DEADLINE)
    s.bind((source, 0))
    s.connect(("127.0.0.1", lim.port))
    return s


def _tls(lim: Limited, source: str = "127.0.0.1") -> ssl.SSLSocket:
    return lim.context().wrap_socket(_tcp(lim, source), server_hostname="127.0.0.1")


def _recv_now(sock: socket.socket) -> bytes | None:
    """What has arrived (b"" once closed), or None if nothing has (a TLS session ticket,
    for one, makes the socket readable without data)."""
    sock.settimeout(0)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        sock.settimeout(DEADLINE)


def _answer(sock: socket.socket, got: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response (status, headers, body); status 0 if the server only closed."""
    buf = bytearray(got)
    deadline = time.monotonic() + DEADLINE
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer within {DEADLINE} s: {bytes(buf[:200])!r}")
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            return 0, {}, bytes(buf)
        buf += chunk
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed(sock: socket.socket) -> bool:
    """Whether the server closes the connection within DEADLINE (reading what it sends)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
    return False


def _flood(sock: socket.socket, head: bytes) -> bytes:
    """Send ``head`` and then an endless chunked body until the server answers, closes,
    or FLOOD bytes went; the first bytes of its answer (b"" if none came)."""
    sock.sendall(head)
    chunk = b"%x\r\n" % MiB + b"x" * MiB + b"\r\n"
    sent = 0
    while sent < FLOOD:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            got = _recv_now(sock)
            if got is not None:
                return got
        try:
            sock.sendall(chunk)
        except OSError:
            break
        sent += MiB
    return b""


def _error(body: bytes) -> dict[str, str]:
    err = json.loads(body)
    assert set(err) >= {"error", "code", "hint"} and err["hint"], err
    return dict(err)


def _chunked_post(path: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: vzd\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()


@contextlib.contextmanager
def _container(d: Daemon, name: str) -> Iterator[Client]:
    """A running container of the test's own, deleted at the end; a client to reach it."""
    r = d.vz("launch", "minimal", name, "--type", "container")
    assert r.returncode == 0, r.stderr
    c = d.client()
    try:
        yield c
    finally:
        c.delete_instance(name, force=True)


# -- bodies ----------------------------------------------------------------------------------


def test_endless_chunked_body_on_the_unix_socket_is_cut_and_memory_stays_bounded(
    limited: Limited,
) -> None:
    d = limited.d
    d.client().list_instances()  # warm: the first requests import and allocate
    before = _rss(d)
    with _unix(d) as sock:
        got = _flood(sock, _chunked_post("/1.0/networks"))
        grown = _rss(d) - before
        assert grown < RSS_BOUND, f"vzd grew by {grown / MiB:.0f} MiB"
        status, _, body = _answer(sock, got)
    assert status == 413, (status, body[:300])
    err = _error(body)
    assert err["code"] == "too_large" and "VZ_MAX_BODY" in err["hint"], err
    assert d.client().server_info().auth == "trusted"  # and it still serves


def test_unauthenticated_join_with_a_huge_body_is_refused_before_it_is_read(
    limited: Limited,
) -> None:
    d = limited.d
    # A declared size over the cap: answered without waiting for a byte of the body.
    with _tls(limited, "127.0.0.7") as sock:
        sock.sendall(
            b"POST /1.0/trust/join HTTP/1.1\r\nHost: vzd\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10737418240\r\n\r\n"
        )
        status, _, body = _answer(sock)
    assert status == 413 and _error(body)["code"] == "too_large", body
    assert "VZ_MAX_JOIN_BODY" in json.loads(body)["hint"]
    # A chunked one is cut at the cap, and vzd's memory stays where it was.
    before = _rss(d)
    with _tls(limited, "127.0.0.7") as sock:
        got = _flood(sock, _chunked_post("/1.0/trust/join"))
        grown = _rss(d) - before
        assert grown < RSS_BOUND, f"vzd grew by {grown / MiB:.0f} MiB"
        status, _, body = _answer(sock, got)
    assert status == 413 and _error(body)["code"] == "too_large", body


# -- time ------------------------------------------------------------------------------------


def _trickle(sock: socket.socket, first: bytes, more: bytes) -> bytes:
    """Send ``first``, then ``more`` a byte every 0.2 s, until the server answers or
    closes; what it sent (b"" if nothing came within DEADLINE)."""
    sock.sendall(first)
    deadline = time.monotonic() + DEADLINE
    for i in range(10**6):
        if time.monotonic() > deadline:
            return b""
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            got = _recv_now(sock)
            if got is not None:
                return got or b"<closed>"
        with contextlib.suppress(OSError):
            sock.sendall(more[i % len(more) : i % len(more) + 1])
    return b""


def test_slow_headers_and_slow_bodies_are_cut_at_their_timeouts(limited: Limited) -> None:
    d = limited.d
    # Headers a byte at a time (Slowloris): 408 with an ErrorBody, then the server closes.
    with _unix(d) as sock:
        got = _trickle(sock, b"GET /1.0 HTTP/1.1\r\nHost: vzd\r\n", b"X-Slow: aaaa\r\n")
        status, headers, body = _answer(sock, got)
        assert status == 408, got[:300]
        err = _error(body)
        assert err["code"] == "timeout" and "VZ_HEADER_TIMEOUT" in err["hint"], err
        assert headers.get("connection") == "close" and _closed(sock)
    # A connection that never sends a request is closed too.
    with _unix(d) as sock:
        assert _closed(sock)
    # A body that comes too slowly: 408, and the connection goes.
    with _unix(d) as sock:
        head = (
            b"POST /1.0/networks HTTP/1.1\r\nHost: vzd\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        got = _trickle(sock, head, b" ")
        status, headers, body = _answer(sock, got)
        assert status == 408, got[:300]
        err = _error(body)
        assert err["code"] == "timeout" and "VZ_BODY_TIMEOUT" in err["hint"], err
        assert _closed(sock)
    # Over TLS, a connection that completed its handshake but sends nothing is closed.
    with _tls(limited, "127.0.0.8") as sock:
        assert _closed(sock)
    assert d.client().server_info().auth == "trusted"


def test_half_open_tls_connections_are_capped_per_address_and_time_out(
    limited: Limited,
) -> None:
    attacker = "127.0.0.2"
    # Four connections that never start their handshake: the cap.
    held = [_tcp(limited, attacker) for _ in range(4)]
    try:
        # The fifth from that address is dropped at once: its handshake cannot complete.
        with _tcp(limited, attacker) as fifth, pytest.raises((ssl.SSLError, OSError)):
            limited.context().wrap_socket(fifth, server_hostname="127.0.0.1")
        # An authenticated client from elsewhere is served meanwhile, and so is a probe.
        with _tls(limited) as authed:
            authed.sendall(
                b"GET /1.0/instances HTTP/1.1\r\nHost: vzd\r\n"
                + f"Authorization: Bearer {limited.token}\r\n\r\n".encode()
            )
            status, _, body = _answer(authed)
            assert status == 200, body
        # The handshake deadline closes the held ones...
        for sock in held:
            assert _closed(sock)
    finally:
        for sock in held:
            sock.close()
    # ...and frees the address's slots.
    with _tls(limited, attacker) as again:
        again.sendall(b"GET /1.0 HTTP/1.1\r\nHost: vzd\r\n\r\n")
        status, _, body = _answer(again)
    assert status == 200 and json.loads(body)["auth"] == "untrusted"


def test_join_and_probe_are_rate_limited_for_unauthenticated_callers(limited: Limited) -> None:
    def call(source: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
        with _tls(limited, source) as sock:
            sock.sendall(request)
            return _answer(sock)

    probe = b"GET /1.0 HTTP/1.1\r\nHost: vzd\r\n\r\n"
    statuses = [call("127.0.0.3", probe)[0] for _ in range(3)]
    assert statuses == [200] * 3
    status, headers, body = call("127.0.0.3", probe)
    assert status == 429 and _error(body)["code"] == "rate_limited", body
    assert 0 < int(headers["retry-after"]) <= 60
    # Callers with credentials, other addresses and the local socket are not limited.
    authed = probe.replace(
        b"\r\n\r\n", f"\r\nAuthorization: Bearer {limited.token}\r\n\r\n".encode()
    )
    assert call("127.0.0.3", authed)[0] == 200
    assert call("127.0.0.4", probe)[0] == 200
    assert limited.d.client().server_info().auth == "trusted"

    junk = b'{"token": "x", "csr": "y"}'
    join = (
        b"POST /1.0/trust/join HTTP/1.1\r\nHost: vzd\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(junk)}\r\n\r\n".encode()
        + junk
    )
    statuses = [call("127.0.0.5", join)[0] for _ in range(2)]
    assert all(400 <= s < 500 and s != 429 for s in statuses), statuses
    status, headers, body = call("127.0.0.5", join)
    assert status == 429 and "retry-after" in headers, body


def test_an_idle_exec_websocket_outlives_the_body_timeout(limited: Limited) -> None:
    d = limited.d
    # The body timeout is on: a plain request that stalls is cut...
    with _unix(d) as sock:
        got = _trickle(
            sock,
            b"PUT /1.0/instances/x/state HTTP/1.1\r\nHost: vzd\r\nContent-Length: 50\r\n\r\n{",
            b" ",
        )
        assert _answer(sock, got)[0] == 408
    # ...but an exec WebSocket silent for three times as long is not.
    with _container(d, "lim-ws"):
        r = d.vz("exec", "lim-ws", "--", "sh", "-c", "sleep 6; echo done")
        assert (r.returncode, r.stdout) == (0, b"done\n"), r.stderr


# -- uploads streamed to disk ----------------------------------------------------------------


class _Unsized(io.RawIOBase):
    """A stream of unknown size: the SDK sends it chunked."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        return self._data.readinto(b)


class _Slow(io.RawIOBase):
    """An endless stream of unknown size that trickles: vzd refuses it and closes while the
    client still sends."""

    def __init__(self) -> None:
        self._until = time.monotonic() + DEADLINE

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        if time.monotonic() > self._until:
            return 0
        time.sleep(0.05)
        n = min(len(b), 64 * 1024)
        b[:n] = b"s" * n
        return n


def _remote(lim: Limited, workdir: Path) -> Client:
    shutil.copy(lim.d.settings.state_dir / "pki" / "ca.crt", workdir / "ca.crt")
    (workdir / "token").write_text(lim.token)
    return Client(remote=Remote("lim", [lim.address], "token", "", workdir))


def test_a_file_push_beyond_its_cap_leaves_no_partial_file(
    limited: Limited, tmp_path: Path
) -> None:
    d = limited.d
    with _container(d, "lim-push") as c:
        big = b"y" * (2 * MiB)
        # A declared size; a chunked body; one still coming when vzd gives up on it.
        for body in (big, _Unsized(big), _Slow()):
            with pytest.raises(VzError) as exc:
                c.push_file("lim-push", "/tmp/big", body)  # type: ignore[arg-type]
            assert exc.value.code == "too_large" and "VZ_MAX_PUSH_SIZE" in (exc.value.hint or "")
            c.close()
            r = d.vz("exec", "lim-push", "--", "ls", "-a", "/tmp")
            assert r.returncode == 0 and b"big" not in r.stdout, r.stdout
        # Over TLS too (an authenticated remote client), where vzd's close is a reset.
        remote = _remote(limited, tmp_path)
        with pytest.raises(VzError) as exc:
            remote.push_file("lim-push", "/tmp/big", _Slow())  # type: ignore[arg-type]
        assert exc.value.code == "too_large", exc.value
        remote.close()
        # Within the cap, a push still works.
        c.push_file("lim-push", "/tmp/ok", _Unsized(b"z" * (MiB // 2)))  # type: ignore[arg-type]
        r = d.vz("exec", "lim-push", "--", "wc", "-c", "/tmp/ok")
        assert r.stdout.split()[0] == str(MiB // 2).encode(), r.stdout


def test_an_import_beyond_its_cap_leaves_nothing_behind(limited: Limited) -> None:
    d = limited.d
    with _container(d, "lim-exp") as c:
        # 3 MiB of incompressible data makes the archive larger than the 2 MiB cap.
        r = d.vz("exec", "lim-exp", "--", "sh", "-c", "head -c 3145728 /dev/urandom > /big")
        assert r.returncode == 0, r.stderr
        c.stop("lim-exp")
        archive = io.BytesIO()
        c.export_instance("lim-exp", archive)
        assert archive.tell() > 3 * MiB
    for body in (io.BytesIO(archive.getvalue()), _Unsized(archive.getvalue())):
        with pytest.raises(VzError) as exc:
            c.import_instance(body, "lim-imp")  # type: ignore[arg-type]
        assert exc.value.code == "too_large" and "VZ_MAX_IMPORT_SIZE" in (exc.value.hint or "")
        c.close()
        assert "lim-imp" not in {i.name for i in c.list_instances()}
        assert not list(d.settings.instances_dir.glob(".import-*"))


def test_uploads_stop_while_the_state_dir_keeps_its_free_space(
    private_daemon: Daemon,
) -> None:
    d = private_daemon
    d.env["VZ_MIN_FREE_DISK"] = "1000TiB"  # more than this disk has
    d.start()
    c = d.client()
    for body in (io.BytesIO(b"x" * 1000), _Unsized(b"x" * 1000)):
        with pytest.raises(VzError) as exc:
            c.import_instance(body, "full")  # type: ignore[arg-type]
        assert exc.value.code == "resource_exhausted", exc.value
        assert "VZ_MIN_FREE_DISK" in (exc.value.hint or "")
        c.close()
        assert not list(d.settings.instances_dir.glob(".import-*"))
    assert c.list_instances() == []
    # Calls that store nothing are not affected.
    assert c.server_info().auth == "trusted"
