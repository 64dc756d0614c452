"""A tiny stand-in for vzd serving canned answers on a unix socket, for SDK and CLI tests.

Plain HTTP is answered by ``http.server``; a request asking for a WebSocket upgrade is
spliced through to a ``websockets`` sync server on a private socket, so both share the one
socket path the client knows, as with the real daemon.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection, unix_serve


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    # Close the connection after reading the request, without answering (vzd died mid-request).
    drop: bool = False
    # Answer, then close the connection without saying so (a keep-alive timeout, a restart).
    hang_up: bool = False


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    headers: dict[str, str]


WsHandler = Callable[[ServerConnection], None]

INSTANCE = {
    "name": "web",
    "type": "microvm",
    "image": "minimal",
    "image_digest": "sha256:abc",
    "limits": {"cpus": 2, "memory": 512 * 1024**2, "cpu_weight": 100, "cpu_pin": None},
    "state": "running",
    "ephemeral": False,
    "accel": "tcg",
    "pid": 4242,
    "reason": None,
    "created_at": "2024-01-01T00:00:00Z",
    "started_at": "2024-01-01T00:00:01Z",
    "agent_version": "1",
    "kernel_release": "6.1.0-cloud-amd64",
    "nics": [{"network": "vzbr0", "ip": "10.80.0.10", "mac": "0a:76:7a:01:02:03", "name": "eth0"}],
}

SERVER_INFO = {"api_version": "1.0", "server_version": "0.1", "auth": "trusted", "pid": 1}

HOST_INFO = {
    "cpus": 2,
    "cpu_affinity": [0, 1],
    "memory_total": 8 * 1024**3,
    "memory_available": 6 * 1024**3,
    "qemu_binary": "/usr/bin/qemu-system-x86_64",
    "qemu_version": "7.2.0",
    "kvm": {"usable": False, "module": None, "reason": "no /dev/kvm"},
    "accel": "tcg",
    "accel_reason": "no /dev/kvm",
    "tsc_khz": None,
    "tsc_source": "none",
    "tsc_flags": [],
    "cgroup_version": 2,
    "kernel_release": "6.1.0-cloud-amd64",
    "boot_id": "b0",
    "probed_at": "2024-01-01T00:00:00Z",
    "probe_ms": 1.5,
}

IMAGE = {
    "name": "minimal",
    "digest": "sha256:0123456789abcdef",
    "kind": "initramfs",
    "kernel_release": "6.1.0-cloud-amd64",
    "size": 3 * 1024**2,
    "created_at": "2024-01-01T00:00:00Z",
    "files": {"initrd": "/var/lib/vzkit/images/minimal/initrd"},
}


def error(status: int, code: str, message: str, hint: str | None = None) -> Reply:
    body: dict[str, Any] = {"error": message, "code": code}
    if hint:
        body["hint"] = hint
    return Reply(status, body)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeVzd

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        self.fake.closed += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        sock: socket.socket = self.request
        head = b""
        with suppress(OSError):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                peeked = sock.recv(65536, socket.MSG_PEEK)
                if not peeked or len(peeked) == len(head):
                    break
                head = peeked
        if b"upgrade: websocket" in head.lower():
            self.server.fake.connections += 1
            self.server.fake.splice(sock)
            self.close_connection = True
            return
        self.server.fake.connections += 1
        super().handle()

    def _any(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().strip(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        seen = Seen(self.command, url.path, dict(parse_qsl(url.query)), body, dict(self.headers))
        fake.seen.append(seen)
        reply = fake.routes.get((self.command, url.path))
        if reply is None:
            reply = Reply(404, {"detail": "Not Found"})
        elif callable(reply):
            reply = reply(seen)
        if reply.drop:
            self.close_connection = True
            return
        data = (
            reply.body
            if isinstance(reply.body, bytes)
            else (b"" if reply.body is None else json.dumps(reply.body).encode())
        )
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", **reply.headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)
        if reply.hang_up:
            self.wfile.flush()
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = _any


class FakeVzd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.routes: dict[tuple[str, str], Reply | Callable[[Seen], Reply]] = {}
        self.ws_routes: dict[str, WsHandler] = {}
        self.seen: list[Seen] = []
        self.connections = 0
        self.closed = 0  # plain HTTP connections the fake has finished with
        self._ws_path = path.with_name(path.name + ".ws")

    def on(self, method: str, path: str, reply: Reply | Callable[[Seen], Reply]) -> None:
        self.routes[(method, path)] = reply

    def requests(self, method: str | None = None) -> list[tuple[str, str]]:
        return [(s.method, s.path) for s in self.seen if method in (None, s.method)]

    def splice(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(str(self._ws_path))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        t.start()
        pump(client, upstream)
        t.join(timeout=10)
        upstream.close()

    def _ws_process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path not in self.ws_routes:
            body = json.dumps({"error": f"no route {path}", "code": "not_found", "hint": "x"})
            resp = conn.respond(404, body)
            return resp
        self.seen.append(Seen("WS", path, dict(parse_qsl(urlsplit(request.path).query)), b"", {}))
        return None

    def _ws_handler(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        self.ws_routes[urlsplit(conn.request.path).path](conn)

    @contextmanager
    def running(self) -> Iterator[FakeVzd]:
        http = _Server(str(self.path), _Handler)
        http.fake = self
        ws = unix_serve(
            self._ws_handler,
            str(self._ws_path),
            process_request=self._ws_process_request,
            compression=None,
            max_size=None,
        )
        threads = [
            threading.Thread(target=http.serve_forever, args=(0.05,), daemon=True),
            threading.Thread(target=ws.serve_forever, daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            http.shutdown()
            http.server_close()
            ws.shutdown()


def exec_script(
    stdout: bytes = b"",
    stderr: bytes = b"",
    exit_code: int = 0,
    echo_stdin: bool = False,
    requests: list[dict[str, Any]] | None = None,
) -> WsHandler:
    """An exec endpoint: records the ExecRequest, optionally echoes stdin, then answers."""

    def handler(ws: ServerConnection) -> None:
        req = json.loads(ws.recv())
        if requests is not None:
            requests.append(req)
        if stdout:
            ws.send(b"\x01" + stdout)
        if stderr:
            ws.send(b"\x02" + stderr)
        if echo_stdin and req.get("stdin"):
            while True:
                msg = ws.recv()
                if isinstance(msg, bytes):
                    if msg == b"\x00":
                        break
                    ws.send(b"\x01" + msg[1:])
        ws.send(json.dumps({"exit_code": exit_code}))
        ws.close()

    return handler
