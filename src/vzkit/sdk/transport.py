"""How the SDK's requests reach a vzd: the transport seam, in the manner of httpx's transports.

A :class:`Transport` takes one request (method, path with query, headers, body) and gives
back a :class:`Response` whose body is read as it arrives, or opens a :class:`WebSocket`.
The client above it knows the API (paths, models, errors); a transport knows only how bytes
get there:

- :class:`UnixTransport`: the local vzd over its unix socket (the default);
- :class:`TLSTransport`: a remote vzd over TLS, with its own CA and the credentials
  ``vz remote add`` stored;
- :class:`vzkit.sdk.asgi.ASGITransport`: an ASGI app called in this process, no socket at
  all (route tests run the real FastAPI app through it).

Both socket transports keep one HTTP/1.1 keep-alive connection per thread. A request lost on
a connection is sent again only when that cannot do anything twice: a GET or HEAD on a
reused connection. A POST (create an instance) or a PUT (change its state) whose connection
broke may have been carried out, so it is reported, never replayed: a replayed create once
answered "instance already exists" for a launch that had failed.

Only the standard library is imported at load time; ``websockets`` when a WebSocket opens.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Protocol, Self, overload

from vzkit.errors import DaemonUnavailable, VzError
from vzkit.sdk._api import error_from_response

if TYPE_CHECKING:
    from vzkit.sdk.remotes import Remote

__all__ = [
    "Body",
    "Response",
    "TLSTransport",
    "Transport",
    "UnixTransport",
    "WebSocket",
    "is_replayable",
]

# A request body: bytes, or a file read as it is sent (then sent chunked if its size is
# not in a Content-Length header).
Body = bytes | IO[bytes] | None

# Methods that change nothing: sending one again after a lost connection is harmless.
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


def is_replayable(method: str, body: Body) -> bool:
    """Whether a request may be sent again when its connection broke: a safe method with
    a body that can be read twice."""
    return method.upper() in _REPLAYABLE and (body is None or isinstance(body, bytes))


class Response(Protocol):
    """An answer whose body is read as it arrives. ``close()`` before the end drops the
    rest (and, on a socket, the connection: it cannot carry another answer then)."""

    status: int

    @overload
    def getheader(self, name: str, /) -> str | None: ...
    @overload
    def getheader(self, name: str, default: str, /) -> str: ...
    def read(self, amt: int | None = None, /) -> bytes: ...
    def read1(self, n: int = -1, /) -> bytes: ...
    def readline(self, limit: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


class WebSocket(Protocol):
    """A WebSocket session; ``recv`` raises ``websockets.exceptions.ConnectionClosed``
    once the other side closed."""

    def send(self, message: str | bytes, /) -> None: ...
    def recv(self) -> str | bytes: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...


class Transport(Protocol):
    def request(
        self, method: str, url: str, *, body: Body = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        """Send one request (``url`` is the path and query); raise DaemonUnavailable when
        the daemon cannot be reached or the connection broke."""
        ...

    def websocket(self, url: str, *, headers: Mapping[str, str] | None = None) -> WebSocket:
        """Open a WebSocket; an error answer to the upgrade raises its VzError."""
        ...

    def reachable(self) -> bool:
        """Whether something accepts connections there (nothing is started for this)."""
        ...

    def unavailable(self, why: str = "") -> DaemonUnavailable:
        """The error saying this daemon cannot be reached, and where to look."""
        ...

    def close(self) -> None: ...


# -- HTTP over a socket -----------------------------------------------------------------------


class _Answer:
    """An ``http.client`` response that knows whether its body was read to the end, so an
    abandoned one takes its connection down with it."""

    def __init__(self, raw: http.client.HTTPResponse, drop: Callable[[], None]) -> None:
        self.raw = raw
        self.status = raw.status
        self._drop = drop

    @property
    def finished(self) -> bool:
        # http.client closes the response itself once the body is read to its end.
        return self.raw.isclosed()

    @overload
    def getheader(self, name: str, /) -> str | None: ...
    @overload
    def getheader(self, name: str, default: str, /) -> str: ...
    def getheader(self, name: str, default: str | None = None, /) -> str | None:
        return self.raw.getheader(name, default)

    def read(self, amt: int | None = None, /) -> bytes:
        return self.raw.read(amt)

    def read1(self, n: int = -1, /) -> bytes:
        return self.raw.read1(n)

    def readline(self, limit: int = -1, /) -> bytes:
        return self.raw.readline(limit)

    def close(self) -> None:
        if not self.finished:
            self._drop()
        self.raw.close()


def _dropped(sock: socket.socket | None) -> bool:
    """Whether an idle keep-alive connection was closed by the other side: it is readable
    (EOF, or bytes nobody asked for) although no request is outstanding."""
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _send_request(
    conn: http.client.HTTPConnection,
    method: str,
    url: str,
    body: Body,
    headers: Mapping[str, str],
) -> None:
    try:
        conn.request(method, url, body=body, headers=headers)
    except OSError as exc:  # a broken pipe, a reset, a TLS EOF
        if body is None or conn.sock is None or isinstance(exc, TimeoutError):
            raise
        # vzd refuses a body as it comes (too large: 413) and then closes: its answer still
        # waits to be read, and says more than the broken pipe. If none came, reading the
        # response fails as the send did.


class _KeepAlive:
    """One keep-alive connection per thread, and the rules for reusing it."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def _new_connection(self) -> http.client.HTTPConnection:
        raise NotImplementedError

    def unavailable(self, why: str = "") -> DaemonUnavailable:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        return {}

    def _drop_connection(self) -> None:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        self._local.answer = None
        if conn is not None:
            conn.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection and whether it carried requests before."""
        answer: _Answer | None = getattr(self._local, "answer", None)
        if answer is not None and not answer.finished:
            # The last answer was abandoned half-read: its rest would be read as the next.
            self._drop_connection()
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and _dropped(conn.sock):
            self._drop_connection()
            conn = None
        if conn is not None:
            return conn, True
        conn = self._new_connection()
        self._local.conn = conn
        return conn, False

    def request(
        self, method: str, url: str, *, body: Body = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        hdrs = {**self._headers(), **(headers or {})}
        for attempt in (0, 1):
            conn, reused = self._connection()
            try:
                _send_request(conn, method, url, body, hdrs)
                raw = conn.getresponse()
            except (http.client.HTTPException, BrokenPipeError, ConnectionResetError) as exc:
                # RemoteDisconnected is both; a garbled answer (BadStatusLine) is lost too.
                self._drop_connection()
                if reused and not attempt and is_replayable(method, body):
                    continue  # the daemon closed the idle connection: nothing was done
                raise self._lost(method, url, exc) from exc
            except OSError as exc:
                self._drop_connection()
                raise self.unavailable(str(exc)) from exc
            except BaseException:
                # Interrupted mid-request (Ctrl-C): the connection's state is unknown now.
                self._drop_connection()
                raise
            answer = _Answer(raw, conn.close)
            self._local.answer = answer
            return answer
        raise AssertionError("unreachable")

    def _lost(self, method: str, url: str, exc: BaseException) -> DaemonUnavailable:
        if method.upper() in _REPLAYABLE:
            return self.unavailable(f"connection lost: {exc}")
        err = self.unavailable(
            f"connection lost during {method} {url.partition('?')[0]}, which vzd may or may "
            f"not have carried out ({exc})"
        )
        return DaemonUnavailable(
            err.message, hint=f"check whether it was done before trying again; {err.hint}"
        )

    def close(self) -> None:
        self._drop_connection()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(_KeepAlive):
    """The local vzd over its unix socket. ``autostart`` (a callable that starts vzd) is
    called once when nothing listens there."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float | None = 300,
        autostart: Callable[[], object] | None = None,
        log: Path | None = None,
    ) -> None:
        super().__init__(timeout)
        self.path = Path(path)
        self.autostart = autostart
        self.log = log

    def unavailable(self, why: str = "") -> DaemonUnavailable:
        where = f"see {self.log}, or start it" if self.log else "start it"
        return DaemonUnavailable(
            f"cannot reach vzd at {self.path}{': ' + why if why else ''}",
            hint=f"{where} with: vz daemon start",
        )

    def reachable(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(str(self.path))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def _new_connection(self) -> http.client.HTTPConnection:
        conn = _UnixHTTPConnection(self.path, self.timeout)
        self._connect(conn.connect)
        return conn

    def _connect(self, connect: Callable[[], object]) -> None:
        try:
            connect()
        except PermissionError as exc:
            raise DaemonUnavailable(
                f"permission denied on vzd's socket {self.path}",
                hint="the socket is mode 0660: join its group, or run as root",
            ) from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if self.autostart is None:
                raise self.unavailable() from exc
            self.autostart()
            try:
                connect()
            except OSError as exc2:
                raise self.unavailable(str(exc2)) from exc2
        except OSError as exc:
            raise self.unavailable(str(exc)) from exc

    def websocket(self, url: str, *, headers: Mapping[str, str] | None = None) -> WebSocket:
        from websockets.sync.client import unix_connect

        opened: list[WebSocket] = []

        def connect() -> None:
            opened.append(
                unix_connect(
                    str(self.path),
                    uri=f"ws://localhost{url}",
                    additional_headers=dict(headers or {}),
                    compression=None,  # a local socket: deflate only costs CPU
                    max_size=None,
                    open_timeout=self.timeout,
                    user_agent_header=None,
                )
            )

        with _handshake_errors():
            self._connect(connect)
        return opened[0]


class _TLSHTTPConnection(http.client.HTTPConnection):
    """HTTPS to a remote vzd: its own CA only, the issued client certificate or a token."""

    def __init__(self, remote: Remote, timeout: float | None) -> None:
        super().__init__(remote.addresses[0], timeout=timeout)
        self.remote = remote

    def connect(self) -> None:
        from vzkit.sdk.remotes import connect_tls

        self.sock, _ = connect_tls(self.remote, self.timeout)


class TLSTransport(_KeepAlive):
    """A remote vzd over TLS (``vz remote add`` stored its CA and credentials)."""

    def __init__(self, remote: Remote, *, timeout: float | None = 300) -> None:
        super().__init__(timeout)
        self.remote = remote

    def unavailable(self, why: str = "") -> DaemonUnavailable:
        return DaemonUnavailable(
            f"cannot reach remote {self.remote.name!r} ({', '.join(self.remote.addresses)})"
            f"{': ' + why if why else ''}",
            hint="check the network, and that the server listens: vz daemon listen",
        )

    def _headers(self) -> dict[str, str]:
        return self.remote.headers()

    def reachable(self) -> bool:
        from vzkit.sdk.remotes import connect_tls

        try:
            sock, _ = connect_tls(self.remote, self.timeout)
        except VzError:
            return False
        sock.close()
        return True

    def _new_connection(self) -> http.client.HTTPConnection:
        conn = _TLSHTTPConnection(self.remote, self.timeout)
        conn.connect()  # connect_tls raises DaemonUnavailable or a VzError naming the peer
        return conn

    def websocket(self, url: str, *, headers: Mapping[str, str] | None = None) -> WebSocket:
        from websockets.sync.client import connect

        from vzkit.sdk.remotes import connect_tls

        # The socket is TLS already (verified against vzd's CA), so the WebSocket runs
        # over it as over plain TCP.
        sock, address = connect_tls(self.remote, self.timeout)
        with _handshake_errors():
            try:
                return connect(
                    f"ws://{address}{url}",
                    sock=sock,
                    additional_headers={**self.remote.headers(), **(headers or {})},
                    max_size=None,
                    open_timeout=self.timeout,
                    user_agent_header=None,
                )
            except OSError as exc:
                raise self.unavailable(str(exc)) from exc


@contextlib.contextmanager
def _handshake_errors() -> Iterator[None]:
    """A refused WebSocket upgrade as the VzError its ErrorBody names."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    try:
        yield
    except InvalidStatus as exc:
        body = bytes(exc.response.body or b"")
        raise error_from_response(exc.response.status_code, body) from exc
    except InvalidHandshake as exc:
        raise VzError(f"WebSocket handshake with vzd failed: {exc}") from exc
