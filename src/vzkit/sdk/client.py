"""The Python SDK: a synchronous client for vzd's REST API.

Requests go through a transport (:mod:`vzkit.sdk.transport`): the local vzd's unix socket by
default, a remote vzd over TLS, or an ASGI app in this process. Every call answers with a
typed model from :mod:`vzkit.api`, never a dict.

Start-up cost matters (``vz run`` sits inside a boot benchmark), so this module imports only
the standard library plus ``vzkit.errors``/``vzkit.settings`` at load time. Pydantic models and
``websockets`` are imported lazily, and where a slow daemon call is under way (creating an
instance boots a guest) they are imported in a background thread so the wait hides the cost.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vzkit._proc import alive
from vzkit.errors import AgentError, DaemonUnavailable, EngineError, NotFound, StateError, VzError
from vzkit.sdk._api import (
    API,
    error_from_response,
    fmt_query,
    json_default,
    parse,
    parse_list,
    q,
)
from vzkit.sdk.resources import Resources
from vzkit.sdk.streams import CHUNK, _FdSink, _feed_stdin, _known_size, _Terminal, _terminal_size
from vzkit.sdk.transport import Body, Response, TLSTransport, Transport, UnixTransport, WebSocket
from vzkit.settings import Settings

if TYPE_CHECKING:
    from vzkit.api.host import HostInfo
    from vzkit.api.instances import (
        ExecResult,
        ImageInfo,
        Instance,
        InstanceCreate,
        InstanceUpdate,
        StateChange,
    )
    from vzkit.api.remote import ServerInfo
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


class Client(Resources):
    """Synchronous vzd client. One keep-alive connection per thread, so threads may share it."""

    def __init__(
        self,
        socket_path: Path | None = None,
        *,
        settings: Settings | None = None,
        autostart: bool = True,
        timeout: float = 300,
        remote: str | Remote | None = None,
        transport: Transport | None = None,
    ) -> None:
        """The local vzd over its unix socket; or (``remote``: a name from ``vz remote
        list``, or a ``Remote``) a vzd on another host over TLS; or whatever ``transport``
        reaches (e.g. an in-process app: :class:`vzkit.sdk.asgi.ASGITransport`)."""
        self.settings = settings or Settings()
        self.socket_path = Path(socket_path) if socket_path else self.settings.socket_path
        if isinstance(remote, str):
            from vzkit.sdk.remotes import RemoteConfig

            remote = RemoteConfig.load().get(remote)
        self.remote = remote
        self.timeout = timeout
        self.autostart = autostart and remote is None and transport is None
        if transport is None and remote is not None:
            transport = TLSTransport(remote, timeout=timeout)
        elif transport is None:
            transport = UnixTransport(
                self.socket_path,
                timeout=timeout,
                autostart=self.start_daemon if self.autostart else None,
                log=self.settings.daemon_log,
            )
        self.transport: Transport = transport

    # -- plumbing ---------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def _unavailable(self, why: str = "") -> DaemonUnavailable:
        return self.transport.unavailable(why)

    def is_running(self) -> bool:
        """Whether something accepts connections there (no autostart)."""
        return self.transport.reachable()

    def start_daemon(self) -> int:
        """Spawn vzd detached and wait for its socket; return the child's pid."""
        if not isinstance(self.transport, UnixTransport):
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
        body: Body = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request; return the answer with its body unread, or raise its error."""
        resp = self.transport.request(method, path + fmt_query(query), body=body, headers=headers)
        if resp.status >= 400:
            data = resp.read()
            resp.close()
            raise error_from_response(resp.status, data)
        return resp

    def _raw(self, method: str, path: str, **kw: Any) -> tuple[bytes, Response]:
        resp = self._send(method, path, **kw)
        data = resp.read()
        resp.close()
        return data, resp

    def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any:
        if payload is not None:
            kw["body"] = json.dumps(payload, default=json_default).encode()
            kw["headers"] = {"Content-Type": "application/json"}
        data, _ = self._raw(method, path, **kw)
        return json.loads(data) if data else None

    def _stream(self, resp: Response) -> Iterator[bytes]:
        try:
            while chunk := resp.read1(CHUNK):
                yield chunk
        finally:
            resp.close()  # early: the rest is dropped, with the connection

    def _ws(self, path: str, query: Mapping[str, Any] | None = None) -> WebSocket:
        return self.transport.websocket(path + fmt_query(query))

    # -- daemon -----------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        """Versions, whether vzd trusts this caller, and (trusted) its pid."""
        data = self._json("GET", API)
        from vzkit.api.remote import ServerInfo

        return parse(ServerInfo, data)

    def host_info(self, refresh: bool = False) -> HostInfo:
        """What vzd found out about its host; ``refresh`` probes again."""
        data = self._json("GET", f"{API}/host", query={"refresh": refresh or None})
        from vzkit.api.host import HostInfo

        return parse(HostInfo, data)

    def shutdown_daemon(self, *, wait: bool = True, timeout: float = 15.0) -> None:
        """Ask vzd to exit (instances keep running); optionally wait until it has exited."""
        pid = self.server_info().pid
        self._raw("POST", f"{API}/daemon/shutdown")
        self.close()
        if not wait:
            return
        deadline = time.monotonic() + timeout
        dead_since: float | None = None
        while time.monotonic() < deadline:
            if not isinstance(self.transport, UnixTransport) or pid is None:
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
        data, _ = self._raw("GET", f"{API}/instances")
        from vzkit.api.instances import Instance

        return parse_list(Instance, data)

    def get_instance(self, name: str) -> Instance:
        data = self._json("GET", f"{API}/instances/{q(name)}")
        from vzkit.api.instances import Instance

        return parse(Instance, data)

    def create_instance(self, req: InstanceCreate | Mapping[str, Any]) -> Instance:
        """Create (and with ``start``, boot) an instance; answers once its agent is ready.

        A plain mapping is accepted so callers on a hot path can skip importing pydantic
        before the request; the daemon validates it either way.
        """
        preload("vzkit.api.instances")  # needed for the answer; imported while the guest boots
        payload = dict(req) if isinstance(req, Mapping) else req.model_dump(mode="json")
        data = self._json("POST", f"{API}/instances", payload)
        from vzkit.api.instances import Instance

        return parse(Instance, data)

    def delete_instance(self, name: str, force: bool = False) -> None:
        self._raw("DELETE", f"{API}/instances/{q(name)}", query={"force": force or None})

    def update_instance(self, name: str, change: InstanceUpdate | Mapping[str, Any]) -> Instance:
        """Change limits, e.g. ``{"limits": {"memory": "512MiB"}}``; live where possible."""
        payload = dict(change) if isinstance(change, Mapping) else change.model_dump(mode="json")
        return self._instance_call("PATCH", f"{API}/instances/{q(name)}", payload)

    def change_state(self, name: str, change: StateChange | Mapping[str, Any]) -> Instance:
        payload = dict(change) if isinstance(change, Mapping) else change.model_dump(mode="json")
        return self._instance_call("PUT", f"{API}/instances/{q(name)}/state", payload)

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
    def _exec_session(self, name: str, request: dict[str, Any]) -> Iterator[WebSocket]:
        with self._ws(f"{API}/instances/{q(name)}/exec") as ws:
            ws.send(json.dumps(request))
            yield ws

    def _pump(
        self, ws: WebSocket, name: str, sinks: Mapping[int, BinaryIO | _FdSink | None]
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
                    from vzkit.api.instances import ExecResult

                    return parse(ExecResult, body)
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
        with self._ws(f"{API}/instances/{q(name)}/console", {"history": history}) as ws:
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
        data, _ = self._raw("GET", f"{API}/instances/{q(name)}/console/log")
        return data

    # -- files ------------------------------------------------------------------------------

    def push_file(
        self,
        name: str,
        path: str,
        data: bytes | BinaryIO,
        mode: int = 0o644,
        parents: bool = False,
        *,
        allow_setid: bool = False,
    ) -> None:
        """Write ``data`` to ``path`` in the instance; vzd refuses a setuid or setgid
        ``mode`` unless ``allow_setid``."""
        headers = {"Content-Type": "application/octet-stream"}
        if not isinstance(data, bytes):
            size = _known_size(data)
            # Without a known size http.client sends the body chunked, as it arrives.
            if size is not None:
                headers["Content-Length"] = str(size)
        query = {
            "path": path,
            "mode": f"{mode:04o}",
            "parents": parents,
            "allow_setid": allow_setid or None,
        }
        self._raw(
            "PUT", f"{API}/instances/{q(name)}/files", query=query, body=data, headers=headers
        )

    def pull_file(self, name: str, path: str) -> tuple[int, Iterator[bytes]]:
        """Return the file's mode and an iterator over its content, read as it is consumed."""
        resp = self._send("GET", f"{API}/instances/{q(name)}/files", query={"path": path})
        raw_mode = resp.getheader("X-Vz-File-Mode") or "0644"
        try:
            mode = int(raw_mode, 8)
        except ValueError:
            mode = 0o644
        return mode, self._stream(resp)

    # -- images -----------------------------------------------------------------------------

    def list_images(self) -> list[ImageInfo]:
        data, _ = self._raw("GET", f"{API}/images")
        from vzkit.api.instances import ImageInfo

        return parse_list(ImageInfo, data)

    def get_image(self, name: str) -> ImageInfo:
        data = self._json("GET", f"{API}/images/{q(name)}")
        from vzkit.api.instances import ImageInfo

        return parse(ImageInfo, data)

    def has_image(self, name: str) -> bool:
        """Whether the image is built, without importing the models (hot path of ``vz run``)."""
        try:
            self._raw("GET", f"{API}/images/{q(name)}")
        except NotFound:
            return False
        return True

    def build_image(
        self, name: str, force: bool = False, progress: ProgressCallback | None = None
    ) -> ImageInfo:
        """Build an image, reporting ``(step, fraction)`` as the daemon streams them."""
        resp = self._send("POST", f"{API}/images/{q(name)}/build", query={"force": force or None})
        return self._image_events(resp, f"building image '{name}'", progress)

    def publish_instance(
        self, name: str, image: str, progress: ProgressCallback | None = None
    ) -> ImageInfo:
        """Turn a VM's disk into a new image (its kernel and initramfs are its image's)."""
        resp = self._send("POST", f"{API}/instances/{q(name)}/publish", query={"image": image})
        return self._image_events(resp, f"publishing {name!r}", progress)

    def export_instance(
        self, name: str, out: BinaryIO, progress: ProgressCallback | None = None
    ) -> int:
        """Write ``name``'s archive (disks, files, snapshots) to ``out``; returns its size."""
        resp = self._send("GET", f"{API}/instances/{q(name)}/export")
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
        return self._instance_call(
            "POST", f"{API}/import", query={"name": name}, body=data, headers=headers
        )

    def _image_events(
        self, resp: Response, what: str, progress: ProgressCallback | None
    ) -> ImageInfo:
        from vzkit.api.instances import ImageInfo

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
                    info = parse(ImageInfo, event["image"])
                    resp.read()
                    return info
                elif "error" in event:
                    resp.read()
                    raise VzError.from_dict(event["error"], resp.status)
        finally:
            resp.close()
        raise EngineError(
            f"{what}: vzd ended the stream without a result",
            hint=f"see {self.settings.daemon_log}",
        )

    def delete_image(self, name: str) -> None:
        self._raw("DELETE", f"{API}/images/{q(name)}")


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
