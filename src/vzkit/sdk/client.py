"""The Python SDK: a synchronous client for vzd's REST API over its unix socket.

Start-up cost matters (``vz run`` sits inside a boot benchmark), so this module imports only
the standard library plus ``vzkit.errors``/``vzkit.settings`` at load time. Pydantic models and
``websockets`` are imported lazily, and where a slow daemon call is under way (creating an
instance boots a guest) they are imported in a background thread so the wait hides the cost.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlencode

from vzkit._proc import alive
from vzkit.errors import (
    AgentError,
    DaemonUnavailable,
    EngineError,
    InvalidConfig,
    NotFound,
    StateError,
    VzError,
)
from vzkit.sdk._api import API, _parse, _q
from vzkit.sdk.resources import Resources
from vzkit.sdk.streams import CHUNK, _FdSink, _feed_stdin, _known_size, _Terminal, _terminal_size
from vzkit.settings import Settings

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

    from vzkit.api.instances import (
        ExecResult,
        ImageInfo,
        Instance,
        InstanceCreate,
        InstanceUpdate,
        StateChange,
    )
    from vzkit.sdk.remotes import Remote

__all__ = ["Client", "EphemeralInstance", "ProgressCallback", "preload"]

ProgressCallback = Callable[[str, "float | None"], None]

_DETACH = b"\x1d"  # Ctrl-], as telnet
_DAEMON_START_WAIT = 15.0

_preloads: dict[str, threading.Thread] = {}


def preload(*modules: str) -> None:
    """Import modules in a background thread while the caller waits on the daemon.

    Only pays off around calls that block on I/O (the GIL is free then); importing twice is
    harmless because the import system serialises on per-module locks.
    """
    for mod in modules:
        if mod in sys.modules or mod in _preloads:
            continue
        t = threading.Thread(target=_quiet_import, args=(mod,), name=f"preload-{mod}", daemon=True)
        _preloads[mod] = t
        t.start()


def _quiet_import(mod: str) -> None:
    # A failure here resurfaces, with its traceback, at the real import in the caller.
    with suppress(Exception):
        importlib.import_module(mod)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
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


class _TLSHTTPConnection(http.client.HTTPConnection):
    """HTTPS to a remote vzd: its own CA only, the issued client certificate or a token."""

    def __init__(self, remote: Remote, timeout: float) -> None:
        super().__init__(remote.addresses[0], timeout=timeout)
        self.remote = remote

    def connect(self) -> None:
        from vzkit.sdk.remotes import connect_tls

        self.sock, _ = connect_tls(self.remote, self.timeout)


def _request(
    conn: http.client.HTTPConnection,
    method: str,
    url: str,
    body: bytes | IO[bytes] | None,
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


def _error_from_response(status: int, data: bytes) -> VzError:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body and "code" in body:
        return VzError.from_dict(body, status)
    # Not an ErrorBody: a framework-level answer (unknown route, schema rejection).
    detail: Any = body.get("detail") if isinstance(body, dict) else None
    text = detail if detail is not None else data.decode("utf-8", "replace").strip()
    if status in (400, 422):
        return InvalidConfig(f"vzd rejected the request: {text}")
    if status == 404:
        return NotFound(f"not found: {text}", hint="is vz newer than vzd? see: vz daemon status")
    return VzError(f"vzd answered HTTP {status}: {text}")


def _json_default(obj: Any) -> Any:
    # Models nested in a plain mapping (e.g. run(limits=Limits(...))).
    dump = getattr(obj, "model_dump", None)
    if dump is None:
        raise TypeError(f"cannot send {type(obj).__name__} as JSON")
    return dump(mode="json")


def _fmt_query(query: Mapping[str, Any] | None) -> str:
    if not query:
        return ""
    items = {
        k: ("true" if v else "false") if isinstance(v, bool) else v
        for k, v in query.items()
        if v is not None
    }
    return "?" + urlencode(items)


class Client(Resources):
    """Synchronous vzd client. One keep-alive connection; not safe to share between threads."""

    def __init__(
        self,
        socket_path: Path | None = None,
        *,
        settings: Settings | None = None,
        autostart: bool = True,
        timeout: float = 300,
        remote: str | Remote | None = None,
    ) -> None:
        """The local vzd over its unix socket, or (``remote``: a name from ``vz remote
        list``, or a ``Remote``) a vzd on another host over TLS."""
        self.settings = settings or Settings()
        self.socket_path = Path(socket_path) if socket_path else self.settings.socket_path
        if isinstance(remote, str):
            from vzkit.sdk.remotes import RemoteConfig

            remote = RemoteConfig.load().get(remote)
        self.remote = remote
        self.autostart = autostart and remote is None
        self.timeout = timeout
        # One keep-alive connection per thread, so a Client can be shared by threads.
        self._local = threading.local()

    @property
    def _conn(self) -> http.client.HTTPConnection | None:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        return conn

    @_conn.setter
    def _conn(self, value: http.client.HTTPConnection | None) -> None:
        self._local.conn = value

    @property
    def _busy(self) -> http.client.HTTPResponse | None:
        """An unread streaming response owns the connection until drained or closed."""
        busy: http.client.HTTPResponse | None = getattr(self._local, "busy", None)
        return busy

    @_busy.setter
    def _busy(self, value: http.client.HTTPResponse | None) -> None:
        self._local.busy = value

    # -- plumbing ---------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._busy is not None:
            self._busy.close()
            self._busy = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _unavailable(self, why: str = "") -> DaemonUnavailable:
        if self.remote is not None:
            return DaemonUnavailable(
                f"cannot reach remote {self.remote.name!r} ({', '.join(self.remote.addresses)})"
                f"{': ' + why if why else ''}",
                hint="check the network, and that the server listens: vz daemon listen",
            )
        return DaemonUnavailable(
            f"cannot reach vzd at {self.socket_path}{': ' + why if why else ''}",
            hint=f"see {self.settings.daemon_log}, or start it with: vz daemon start",
        )

    def _open(self) -> http.client.HTTPConnection:
        if self.remote is not None:
            tls = _TLSHTTPConnection(self.remote, self.timeout)
            tls.connect()
            return tls
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.connect()
        except PermissionError as exc:
            raise DaemonUnavailable(
                f"permission denied on vzd's socket {self.socket_path}",
                hint="the socket is mode 0660: join its group, or run as root",
            ) from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if not self.autostart:
                raise self._unavailable() from exc
            self.start_daemon()
            try:
                conn.connect()
            except OSError as exc2:
                raise self._unavailable(str(exc2)) from exc2
        except OSError as exc:
            raise self._unavailable(str(exc)) from exc
        return conn

    def is_running(self) -> bool:
        """Whether something accepts connections on the socket (no autostart)."""
        if self.remote is not None:
            try:
                self.server_info()
                return True
            except DaemonUnavailable:
                return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(str(self.socket_path))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def start_daemon(self) -> int:
        """Spawn vzd detached and wait for its socket; return the child's pid."""
        if self.remote is not None:
            raise self._unavailable("vzd on another host is started there, not from here")
        log_path = self.settings.daemon_log
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        except OSError as exc:
            raise DaemonUnavailable(
                f"cannot start vzd: cannot open its log {log_path}: {exc.strerror}",
                hint="run as root, or point VZ_STATE_DIR/VZ_RUNTIME_DIR at writable directories",
            ) from exc
        env = dict(os.environ)
        # The daemon must listen where this client looks, even when --socket moved it.
        env["VZ_SOCKET"] = str(self.socket_path)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vzkit.server.main"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=env,
                close_fds=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + _DAEMON_START_WAIT
        while time.monotonic() < deadline:
            if self.is_running():
                return proc.pid
            if proc.poll() is not None:
                raise self._unavailable(f"vzd exited with status {proc.returncode}")
            time.sleep(0.05)
        raise self._unavailable(f"vzd did not open its socket within {_DAEMON_START_WAIT:g}s")

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: bytes | IO[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request; return the response with its body unread, or raise its error."""
        if self._busy is not None:
            # The caller abandoned a stream half-read: this connection is unusable now.
            self.close()
        url = path + _fmt_query(query)
        hdrs = dict(headers or {})
        if self.remote is not None:
            hdrs.update(self.remote.headers())
        for attempt in (0, 1):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = self._open()
            conn = self._conn
            try:
                _request(conn, method, url, body, hdrs)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                # A reused keep-alive connection the daemon closed while idle: retry once,
                # the request never reached it. Streaming bodies cannot be replayed.
                replayable = body is None or isinstance(body, bytes)
                if fresh or attempt or not replayable:
                    raise self._unavailable(f"connection lost: {exc}") from exc
                continue
            except OSError as exc:
                self.close()
                raise self._unavailable(str(exc)) from exc
            except BaseException:
                # Interrupted mid-request (Ctrl-C): the connection's state is unknown now.
                self.close()
                raise
            if resp.status >= 400:
                data = resp.read()
                if resp.will_close:
                    self.close()
                raise _error_from_response(resp.status, data)
            return resp
        raise AssertionError("unreachable")

    def _raw(self, method: str, path: str, **kw: Any) -> tuple[bytes, http.client.HTTPResponse]:
        resp = self._send(method, path, **kw)
        data = resp.read()
        if resp.will_close:
            self.close()
        return data, resp

    def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any:
        if payload is not None:
            kw["body"] = json.dumps(payload, default=_json_default).encode()
            kw["headers"] = {"Content-Type": "application/json"}
        data, _ = self._raw(method, path, **kw)
        return json.loads(data) if data else None

    def _stream(self, resp: http.client.HTTPResponse) -> Iterator[bytes]:
        self._busy = resp
        try:
            while chunk := resp.read1(CHUNK):
                yield chunk
        finally:
            if self._busy is resp:
                self._busy = None
                if resp.will_close or not resp.isclosed():
                    self.close()

    # -- daemon -----------------------------------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        """``{"api_version", "server_version", "pid"}``."""
        info: dict[str, Any] = self._json("GET", API)
        return info

    def host_info(self, refresh: bool = False) -> dict[str, Any]:
        # Typed as a dict until vzkit.host.probe's HostInfo model settles.
        info: dict[str, Any] = self._json("GET", f"{API}/host", query={"refresh": refresh or None})
        return info

    def shutdown_daemon(self, *, wait: bool = True, timeout: float = 15.0) -> None:
        """Ask vzd to exit (instances keep running); optionally wait until it has exited."""
        pid = int(self.server_info()["pid"])
        self._raw("POST", f"{API}/daemon/shutdown")
        self.close()
        if not wait:
            return
        deadline = time.monotonic() + timeout
        dead_since: float | None = None
        while time.monotonic() < deadline:
            if self.remote is not None:
                if not self.is_running():  # another host: its pid means nothing here
                    return
                time.sleep(0.05)
                continue
            # The socket goes first; the process (holding the daemon lock) a moment later.
            # Wait for both, so a daemon started right after this one finds the lock free.
            if not self.socket_path.exists() and not alive(pid):
                return
            if self.is_running():
                dead_since = None
            elif dead_since is None:
                dead_since = time.monotonic()
            elif time.monotonic() - dead_since > 1.0:
                return  # nobody listens: a socket file left behind by a daemon that died
            time.sleep(0.05)
        raise DaemonUnavailable(
            f"vzd did not exit within {timeout:g}s",
            hint=f"see {self.settings.daemon_log}",
        )

    # -- instances --------------------------------------------------------------------------

    def list_instances(self) -> list[Instance]:
        return [_parse("Instance", d) for d in self._json("GET", f"{API}/instances")]

    def get_instance(self, name: str) -> Instance:
        data = self._json("GET", f"{API}/instances/{_q(name)}")
        result: Instance = _parse("Instance", data)
        return result

    def create_instance(self, req: InstanceCreate | Mapping[str, Any]) -> Instance:
        """Create (and with ``start``, boot) an instance; answers once its agent is ready.

        A plain mapping is accepted so callers on a hot path can skip importing pydantic
        before the request; the daemon validates it either way.
        """
        preload("vzkit.api.instances")  # needed for the answer; imported while the guest boots
        payload = dict(req) if isinstance(req, Mapping) else req.model_dump(mode="json")
        data = self._json("POST", f"{API}/instances", payload)
        result: Instance = _parse("Instance", data)
        return result

    def delete_instance(self, name: str, force: bool = False) -> None:
        self._raw("DELETE", f"{API}/instances/{_q(name)}", query={"force": force or None})

    def update_instance(self, name: str, change: InstanceUpdate | Mapping[str, Any]) -> Instance:
        """Change limits, e.g. ``{"limits": {"memory": "512MiB"}}``; live where possible."""
        payload = dict(change) if isinstance(change, Mapping) else change.model_dump(mode="json")
        data = self._json("PATCH", f"{API}/instances/{_q(name)}", payload)
        result: Instance = _parse("Instance", data)
        return result

    def change_state(self, name: str, change: StateChange | Mapping[str, Any]) -> Instance:
        payload = dict(change) if isinstance(change, Mapping) else change.model_dump(mode="json")
        data = self._json("PUT", f"{API}/instances/{_q(name)}/state", payload)
        result: Instance = _parse("Instance", data)
        return result

    def start(self, name: str) -> Instance:
        return self.change_state(name, {"action": "start"})

    def stop(self, name: str, force: bool = False, timeout: float = 30) -> Instance:
        return self.change_state(name, {"action": "stop", "force": force, "timeout": timeout})

    def restart(self, name: str, force: bool = False, timeout: float = 30) -> Instance:
        return self.change_state(name, {"action": "restart", "force": force, "timeout": timeout})

    def pause(self, name: str) -> Instance:
        return self.change_state(name, {"action": "pause"})

    def resume(self, name: str) -> Instance:
        return self.change_state(name, {"action": "resume"})

    @contextmanager
    def run(self, image: str = "minimal", **create_kwargs: Any) -> Iterator[EphemeralInstance]:
        """Create and start an ephemeral instance; force-delete it on exit, whatever happened."""
        preload("websockets.sync.client")
        body: dict[str, Any] = {"image": image, "ephemeral": True, "start": True}
        body.update(create_kwargs)
        inst = self.create_instance(body)
        try:
            yield EphemeralInstance(self, inst)
        finally:
            self.delete_quietly(inst.name)

    def delete_quietly(self, name: str, *, wait: float = 10.0) -> None:
        """Force-delete for cleanup paths: gone already is fine; a still-booting one is awaited."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self.delete_instance(name, force=True)
                return
            except NotFound:
                return
            except StateError:
                # Still 'creating' (e.g. interrupted mid-boot): the daemon refuses until it settles.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # -- exec / console ---------------------------------------------------------------------

    def _ws(self, path: str, query: Mapping[str, Any] | None = None) -> ClientConnection:
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect, unix_connect

        uri = f"ws://localhost{path}{_fmt_query(query)}"
        if self.autostart and not self.is_running():
            self.start_daemon()
        try:
            if self.remote is not None:
                from vzkit.sdk.remotes import connect_tls

                # The socket is TLS already (verified against vzd's CA), so the WebSocket
                # runs over it as over plain TCP.
                sock, address = connect_tls(self.remote, self.timeout)
                return connect(
                    f"ws://{address}{path}{_fmt_query(query)}",
                    sock=sock,
                    additional_headers=self.remote.headers(),
                    max_size=None,
                    open_timeout=self.timeout,
                    user_agent_header=None,
                )
            return unix_connect(
                str(self.socket_path),
                uri=uri,
                compression=None,  # local socket: deflate only costs CPU
                max_size=None,
                open_timeout=self.timeout,
                user_agent_header=None,
            )
        except InvalidStatus as exc:
            body = bytes(exc.response.body or b"")
            raise _error_from_response(exc.response.status_code, body) from exc
        except InvalidHandshake as exc:
            raise VzError(f"WebSocket handshake with vzd failed: {exc}") from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise self._unavailable() from exc
        except OSError as exc:
            raise self._unavailable(str(exc)) from exc

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | BinaryIO | None = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        tty: bool = False,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run argv in the instance; stream output into ``stdout``/``stderr`` as it arrives.

        ``stdin`` None means the command reads /dev/null. Output with no file to go to is
        dropped (library code never writes to the process's own stdout): use
        :meth:`exec_capture` to collect it. The first Ctrl-C is forwarded to the command as
        SIGINT; a second one abandons the call.
        """
        preload("vzkit.api.instances")
        request = {
            "argv": list(argv),
            "env": dict(env or {}),
            "cwd": cwd,
            "tty": tty,
            "stdin": stdin is not None,
            "timeout": timeout,
        }
        with self._exec_session(name, request) as ws:
            feeder = None
            if stdin is not None:
                feeder = threading.Thread(
                    target=_feed_stdin, args=(ws, stdin), name="vz-exec-stdin", daemon=True
                )
                feeder.start()
            sinks = {1: stdout, 2: stderr}
            interrupted = False
            while True:
                try:
                    return self._pump(ws, name, sinks)
                except KeyboardInterrupt:
                    if interrupted:
                        raise
                    interrupted = True
                    with suppress(Exception):
                        ws.send(json.dumps({"signal": 2}))

    def exec_capture(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | BinaryIO | None = None,
        timeout: float | None = None,
        tty: bool = False,
    ) -> tuple[ExecResult, bytes, bytes]:
        """Run argv and return ``(result, stdout, stderr)`` (with a tty, all is stdout)."""
        import io

        out, err = io.BytesIO(), io.BytesIO()
        result = self.exec(
            name,
            argv,
            env=env,
            cwd=cwd,
            stdin=stdin,
            stdout=out,
            stderr=err,
            timeout=timeout,
            tty=tty,
        )
        return result, out.getvalue(), err.getvalue()

    def exec_interactive(
        self,
        name: str,
        argv: Sequence[str],
        *,
        tty: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run argv attached to this process's terminal (``vz shell``, ``vz exec -t``)."""
        preload("vzkit.api.instances")
        rows, cols = _terminal_size()
        request = {
            "argv": list(argv),
            "env": dict(env or {}),
            "cwd": cwd,
            "tty": tty,
            "rows": rows,
            "cols": cols,
            "stdin": True,
            "timeout": timeout,
        }
        with self._exec_session(name, request) as ws, _Terminal(tty) as term:
            term.start_forwarding(ws, channel=b"\x00", resize=tty)
            out = _FdSink(sys.stdout.fileno())
            err = _FdSink(sys.stderr.fileno())
            return self._pump(ws, name, {1: out, 2: err})

    @contextmanager
    def _exec_session(self, name: str, request: dict[str, Any]) -> Iterator[ClientConnection]:
        with self._ws(f"{API}/instances/{_q(name)}/exec") as ws:
            ws.send(json.dumps(request))
            yield ws

    def _pump(
        self, ws: ClientConnection, name: str, sinks: Mapping[int, BinaryIO | _FdSink | None]
    ) -> ExecResult:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                msg = ws.recv()
                if isinstance(msg, bytes):
                    if len(msg) < 2:
                        continue
                    sink = sinks.get(msg[0])
                    if sink is not None:
                        sink.write(msg[1:])
                        sink.flush()
                    continue
                body = json.loads(msg)
                if "exit_code" in body:
                    result: ExecResult = _parse("ExecResult", body)
                    return result
                if "error" in body:
                    raise VzError.from_dict(body, 500)
                # Unknown control messages from a newer daemon are ignored on purpose.
        except ConnectionClosed as exc:
            raise AgentError(
                f"exec in '{name}' ended without a result ({exc})",
                hint=f"the instance may have stopped: vz info {name}",
            ) from exc

    def console(self, name: str, *, history: bool = True) -> None:
        """Attach this terminal to the instance's serial console until Ctrl-] is pressed."""
        from websockets.exceptions import ConnectionClosed

        out = _FdSink(sys.stdout.fileno())
        with self._ws(f"{API}/instances/{_q(name)}/console", {"history": history}) as ws:
            os.write(
                sys.stderr.fileno(), f"Connected to {name} console; Ctrl-] to detach\n".encode()
            )
            with _Terminal(True) as term:
                term.start_forwarding(ws, channel=b"", resize=False, detach=_DETACH)
                with suppress(ConnectionClosed):
                    while True:
                        msg = ws.recv()
                        out.write(msg if isinstance(msg, bytes) else msg.encode())
                        out.flush()
        os.write(sys.stderr.fileno(), b"\nDetached.\n")

    def console_log(self, name: str) -> bytes:
        data, _ = self._raw("GET", f"{API}/instances/{_q(name)}/console/log")
        return data

    # -- files ------------------------------------------------------------------------------

    def push_file(
        self,
        name: str,
        path: str,
        data: bytes | BinaryIO,
        mode: int = 0o644,
        parents: bool = False,
    ) -> None:
        headers = {"Content-Type": "application/octet-stream"}
        if not isinstance(data, bytes):
            size = _known_size(data)
            # Without a known size http.client sends the body chunked, as it arrives.
            if size is not None:
                headers["Content-Length"] = str(size)
        query = {"path": path, "mode": f"{mode:04o}", "parents": parents}
        self._raw(
            "PUT", f"{API}/instances/{_q(name)}/files", query=query, body=data, headers=headers
        )

    def pull_file(self, name: str, path: str) -> tuple[int, Iterator[bytes]]:
        """Return the file's mode and an iterator over its content, read as it is consumed."""
        resp = self._send("GET", f"{API}/instances/{_q(name)}/files", query={"path": path})
        raw_mode = resp.getheader("X-Vz-File-Mode") or "0644"
        try:
            mode = int(raw_mode, 8)
        except ValueError:
            mode = 0o644
        return mode, self._stream(resp)

    # -- images -----------------------------------------------------------------------------

    def list_images(self) -> list[ImageInfo]:
        return [_parse("ImageInfo", d) for d in self._json("GET", f"{API}/images")]

    def get_image(self, name: str) -> ImageInfo:
        data = self._json("GET", f"{API}/images/{_q(name)}")
        result: ImageInfo = _parse("ImageInfo", data)
        return result

    def has_image(self, name: str) -> bool:
        """Whether the image is built, without importing the models (hot path of ``vz run``)."""
        try:
            self._raw("GET", f"{API}/images/{_q(name)}")
        except NotFound:
            return False
        return True

    def build_image(
        self, name: str, force: bool = False, progress: ProgressCallback | None = None
    ) -> ImageInfo:
        """Build an image, reporting ``(step, fraction)`` as the daemon streams them."""
        resp = self._send("POST", f"{API}/images/{_q(name)}/build", query={"force": force or None})
        return self._image_events(resp, f"building image '{name}'", progress)

    def publish_instance(
        self, name: str, image: str, progress: ProgressCallback | None = None
    ) -> ImageInfo:
        """Turn a VM's disk into a new image (its kernel and initramfs are its image's)."""
        resp = self._send("POST", f"{API}/instances/{_q(name)}/publish", query={"image": image})
        return self._image_events(resp, f"publishing {name!r}", progress)

    def export_instance(
        self, name: str, out: BinaryIO, progress: ProgressCallback | None = None
    ) -> int:
        """Write ``name``'s archive (disks, files, snapshots) to ``out``; returns its size."""
        resp = self._send("GET", f"{API}/instances/{_q(name)}/export")
        total = int(resp.getheader("X-Vz-Export-Size") or 0)
        written = 0
        for chunk in self._stream(resp):
            out.write(chunk)
            written += len(chunk)
            if progress is not None:
                progress("exporting", min(written / total, 1.0) if total else None)
        return written

    def import_instance(self, data: BinaryIO, name: str | None = None) -> Instance:
        """Create an instance from an archive made by :meth:`export_instance`."""
        headers = {"Content-Type": "application/x-tar"}
        size = _known_size(data)
        if size is not None:
            headers["Content-Length"] = str(size)
        raw, _ = self._raw(
            "POST", f"{API}/import", query={"name": name}, body=data, headers=headers
        )
        result: Instance = _parse("Instance", json.loads(raw))
        return result

    def _image_events(
        self, resp: http.client.HTTPResponse, what: str, progress: ProgressCallback | None
    ) -> ImageInfo:
        self._busy = resp
        try:
            for line in iter(resp.readline, b""):
                if not line.strip():
                    continue
                event = json.loads(line)
                if "progress" in event:
                    if progress is not None:
                        p = event["progress"]
                        progress(str(p.get("step", "")), p.get("fraction"))
                elif "image" in event:
                    info: ImageInfo = _parse("ImageInfo", event["image"])
                    resp.read()
                    return info
                elif "error" in event:
                    resp.read()
                    raise VzError.from_dict(event["error"], resp.status)
        finally:
            self._busy = None
            if resp.will_close or not resp.isclosed():
                self.close()
        raise EngineError(
            f"{what}: vzd ended the stream without a result",
            hint=f"see {self.settings.daemon_log}",
        )

    def delete_image(self, name: str) -> None:
        self._raw("DELETE", f"{API}/images/{_q(name)}")


class EphemeralInstance:
    """A running instance owned by :meth:`Client.run`; deleted when the block ends."""

    def __init__(self, client: Client, instance: Instance) -> None:
        self.client = client
        self.instance = instance

    @property
    def name(self) -> str:
        return self.instance.name

    def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        return self.client.exec(self.name, argv, **kwargs)

    def exec_capture(self, argv: Sequence[str], **kwargs: Any) -> tuple[ExecResult, bytes, bytes]:
        return self.client.exec_capture(self.name, argv, **kwargs)
