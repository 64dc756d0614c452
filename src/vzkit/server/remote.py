"""Remote access: the TLS listener, who each caller is, and what an unknown one may do.

The unix socket's permissions are its authentication (0660 root:vz): a caller there is
trusted, and known by the uid the kernel reports (SO_PEERCRED). Over TLS a caller is
trusted through a client certificate vzd issued and still lists, or a bearer token; anyone
else gets the version probe and the join call, nothing more.

uvicorn does not put TLS details into the ASGI scope, so each connection's protocol object
notes its peer certificate (keyed by the peer address, which is what the scope carries)
when the connection is made; the middleware looks it up per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from vzkit.api.remote import ServerConfig
from vzkit.errors import Conflict, Forbidden, InvalidConfig, Unauthorized, VzError
from vzkit.network.links import host_addresses
from vzkit.server.db import Database
from vzkit.server.limits import ConnectionGuard, guard_http, serve_tls, server_options
from vzkit.server.metrics import AuditLog
from vzkit.settings import Settings

if TYPE_CHECKING:
    from vzkit.pki import CertAuthority
    from vzkit.server.trust import TrustStore

log = logging.getLogger(__name__)


# Answered without credentials: the version probe, and trading a join token for a
# certificate (the token is the credential there).
_OPEN = {("GET", "/1.0"), ("GET", "/1.0/"), ("POST", "/1.0/trust/join")}
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LISTEN_KEY = "server.listen"
CALLER_KEY = "vzkit.caller"
# Set by the TLS server's entry point only, so "came over the network" cannot be forged by
# a header (a scheme is: X-Forwarded-Proto).
_VIA_TLS = "vzkit.via_tls"


@dataclass(frozen=True)
class Caller:
    kind: str  # "unix", "certificate", "token" or "anonymous"
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


def caller_of(scope: Scope) -> Caller | None:
    caller: Caller | None = scope.get(CALLER_KEY)
    return caller


# -- peers ---------------------------------------------------------------------------------


class Peers:
    """Peer address -> the DER client certificate it presented (None: none)."""

    def __init__(self) -> None:
        self._by_addr: dict[tuple[str, int], tuple[asyncio.BaseTransport, bytes | None]] = {}

    def note(self, transport: asyncio.BaseTransport) -> None:
        # Entries of closed connections go on the next connection: an address seen in a
        # request always belongs to a live connection, whose entry replaced any older one.
        for key, (tr, _) in list(self._by_addr.items()):
            if tr.is_closing():
                del self._by_addr[key]
        peer = transport.get_extra_info("peername")
        ssl_object = transport.get_extra_info("ssl_object")
        if not isinstance(peer, tuple) or ssl_object is None:
            return
        self._by_addr[(str(peer[0]), int(peer[1]))] = (
            transport,
            ssl_object.getpeercert(binary_form=True),
        )

    def certificate(self, client: Any) -> bytes | None:
        if not isinstance(client, list | tuple) or len(client) != 2:
            return None
        entry = self._by_addr.get((str(client[0]), int(client[1])))
        return None if entry is None else entry[1]


def _tagged(cls: type[asyncio.Protocol], on_connect: Callable[[Any, Any], None]) -> type[Any]:
    def connection_made(self: Any, transport: Any) -> None:
        cls.connection_made(self, transport)
        on_connect(self, transport)

    return type(f"Vz{cls.__name__}", (cls,), {"connection_made": connection_made})


def tag_unix(config: uvicorn.Config) -> None:
    """Make a unix-socket server's scope carry the caller's uid as its "client"."""
    if not config.loaded:
        config.load()

    def on_connect(proto: Any, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", cred)
            proto.client = (f"uid={uid}", pid)

    config.http_protocol_class = _tagged(config.http_protocol_class, on_connect)


# -- the middleware --------------------------------------------------------------------------


class AuthMiddleware:
    def __init__(self, app: ASGIApp, remote: RemoteAccess, audit: AuditLog) -> None:
        self.app = app
        self.remote = remote
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            scope[CALLER_KEY] = self.remote.identify(scope)
        except VzError as exc:
            method = scope.get("method", "GET")
            if method in MUTATING:
                self.audit.record(method, scope["path"], exc.http_status, 0.0, "anonymous")
            await _deny(scope, receive, send, exc)
            return
        await self.app(scope, receive, send)


async def _deny(scope: Scope, receive: Receive, send: Send, exc: VzError) -> None:
    body = json.dumps(exc.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.http_status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="vzd"'))
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {"type": "websocket.http.response.start", "status": exc.http_status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


# -- the listener ----------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every address) -> (host, port)."""
    hint = "give HOST:PORT, e.g. 127.0.0.1:8443, [::1]:8443 or :8443 for every address"
    host, sep, port_s = text.strip().rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise InvalidConfig(f"invalid listen address {text!r}: no valid port", hint=hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("", "*"):
        host = "::"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host.replace("-", "").replace(".", "").isalnum():
            raise InvalidConfig(f"invalid listen address {text!r}", hint=hint) from None
    return host, int(port_s)


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidConfig(
            f"cannot resolve listen host {host!r}: {exc.strerror}",
            hint="use an address of this host",
        ) from exc
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            raise Conflict(
                f"cannot listen on {host}:{port}: the port is in use",
                hint="choose another port, or stop what holds it (ss -ltnp)",
            ) from exc
        raise InvalidConfig(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="use an address of this host",
        ) from exc
    return sock


class _Server(uvicorn.Server):
    # The unix-socket server owns SIGTERM/SIGINT; a second server catching them too would
    # swallow the signal the first needs to stop.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RemoteAccess:
    """The trust store, vzd's CA, and the TLS listener (off until given an address)."""

    def __init__(
        self, db: Database, pki_dir: Path, env_listen: str | None, settings: Settings | None = None
    ) -> None:
        from vzkit.server.trust import TrustStore

        self._db = db
        self.pki_dir = pki_dir
        self._ca: CertAuthority | None = None
        self.trust: TrustStore = TrustStore(db, self.ca)
        self.peers = Peers()
        self.listen: str | None = env_listen or db.get_meta(_LISTEN_KEY)
        self._env = env_listen is not None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._bound: tuple[str, int] | None = None
        self._app: ASGIApp | None = None
        self.settings = settings or Settings()
        self.guard = ConnectionGuard(self.settings.max_anonymous_connections)

    def ca(self) -> CertAuthority:
        if self._ca is None:
            from vzkit.pki import load_or_create_ca

            self._ca = load_or_create_ca(self.pki_dir)
        return self._ca

    def ca_pem(self) -> str:
        from vzkit.pki import cert_pem

        return cert_pem(self.ca().cert).decode()

    # -- identity ----------------------------------------------------------------------------

    def identify(self, scope: Scope) -> Caller:
        client = scope.get("client")
        if not scope.get(_VIA_TLS):
            uid = client[0] if isinstance(client, list | tuple) and client else ""
            return Caller("unix", uid if str(uid).startswith("uid=") else "")
        der = self.peers.certificate(client)
        if der is not None:
            from vzkit.pki import fingerprint

            rec = self.trust.by_certificate(fingerprint(der))
            if rec is None:
                raise Forbidden(
                    "this client certificate is no longer trusted by vzd",
                    hint="ask the server's admin for a new join token: vz trust add NAME",
                )
            self.guard.vouch(client)
            return Caller("certificate", rec.name)
        token = _bearer(scope)
        if token is not None:
            rec = self.trust.by_token(token)
            if rec is None:
                raise Unauthorized(
                    "the bearer token is not valid (unknown, removed or expired)",
                    hint="make a new one on the server: vz trust add NAME --type token",
                )
            self.guard.vouch(client)
            return Caller("token", rec.name)
        if (scope.get("method", "GET"), scope["path"]) in _OPEN and scope["type"] == "http":
            return Caller("anonymous", "")
        raise Unauthorized(
            "authentication required: present a client certificate or a bearer token",
            hint="add this server as a remote: vz remote add NAME TOKEN "
            "(the token from: vz trust add NAME, run on the server)",
        )

    # -- listener ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "listen": self.listen,
            "addresses": self.addresses() if self._bound else [],
            "ca_fingerprint": self.ca().fingerprint if self._bound else None,
            "from_environment": self._env,
        }

    def addresses(self) -> list[str]:
        """Where clients can reach the TLS listener (goes into join tokens)."""
        if self._bound is None:
            return []
        host, port = self._bound
        hosts = host_addresses() if host in ("::", "0.0.0.0") else [host]
        return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts]

    async def start(self, app: ASGIApp) -> None:
        self._app = app
        if self.listen:
            try:
                await self._start(self.listen)
            except VzError as exc:
                # A bad stored address must not keep vzd (and the local socket) down.
                log.error("TLS listener not started: %s", exc.message)

    async def _start(self, listen: str) -> None:
        assert self._app is not None
        host, port = parse_listen(listen)
        sock = _bind_tcp(host, port)
        try:
            crt, key = await asyncio.to_thread(self._server_cert, host)
            app = self._app

            async def via_tls(scope: Scope, receive: Receive, send: Send) -> None:
                scope[_VIA_TLS] = True
                await app(scope, receive, send)

            config = uvicorn.Config(
                via_tls,
                log_level="warning",
                # vzd is no proxy's backend: X-Forwarded-* must not change who a peer is.
                proxy_headers=False,
                access_log=False,
                lifespan="off",
                **server_options(),
                # Stopping the listener must not wait for a remote client's open stream.
                timeout_graceful_shutdown=3,
                ssl_certfile=str(crt),
                ssl_keyfile=str(key),
                ssl_ca_certs=str(self.pki_dir / "ca.crt"),
                ssl_cert_reqs=ssl.CERT_OPTIONAL,
            )
            config.load()
            assert config.ssl is not None
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
            config.http_protocol_class = _tagged(
                config.http_protocol_class, lambda _p, tr: self.peers.note(tr)
            )
            guard_http(config, self.settings)
            serve_tls(config, self.settings, self.guard)
            server = _Server(config)
        except BaseException:
            sock.close()
            raise
        self._server = server
        self._bound = (host, port)
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        log.info("TLS API listening on %s", listen)

    def _server_cert(self, host: str) -> tuple[Path, Path]:
        from vzkit.pki import ensure_server_cert

        ips = ["127.0.0.1", "::1"]
        ips += host_addresses() if host in ("::", "0.0.0.0") else []
        dns = [socket.gethostname(), "localhost"]
        try:
            ipaddress.ip_address(host)
            if host not in ("::", "0.0.0.0"):
                ips.append(host)
        except ValueError:
            dns.append(host)
        return ensure_server_cert(self.pki_dir, self.ca(), dns, ips)

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        self._bound = None
        self.guard.abort_pending()
        if server is None or task is None:
            return
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)

    async def configure(self, cfg: ServerConfig) -> dict[str, Any]:
        """Apply a new listen address live; stored only once it is bound."""
        listen = (cfg.listen or "").strip() or None
        if listen is not None:
            parse_listen(listen)
        old = self.listen
        if listen == old and (listen is None or self._bound is not None):
            return self.info()
        await self.stop()
        try:
            if listen is not None:
                await self._start(listen)
        except BaseException:
            if old is not None:
                with contextlib.suppress(VzError):
                    await self._start(old)
            raise
        self.listen = listen
        self._env = False
        self._db.set_meta(_LISTEN_KEY, listen)
        return self.info()


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return str(token.strip())
    return None
