"""What a client can make vzd hold: request bodies, time, connections and calls.

Without these a client (an unauthenticated one over TLS included) could grow vzd's memory
with a body that never ends, or hold its connections open for ever by sending slowly.

- **Bodies** (`RequestLimits`, a pure ASGI middleware inside authentication): each route
  has its cap (`BODY_LIMITS`; small JSON for the rest). A `Content-Length` over the cap is
  answered 413 before a byte of the body is read; a chunked body is counted as it arrives
  and cut at the cap. The two routes that stream to disk (import, file push) have caps of
  their own and also stop while the state directory still has `min_free_disk` free (507).
  Every answer is an ErrorBody, and whatever the route made of the body so far is removed
  by the route itself (an import's staging dir, a push's spool file).
- **Time**: a request's headers must arrive within `header_timeout` (`_GuardedH11`, a
  subclass of uvicorn's h11 protocol, since no ASGI app sees a request before its headers
  are complete); a small body within `body_timeout` in all, a streamed one with no gap
  longer than that. WebSockets (exec, console, events) are not timed once upgraded: they are
  meant to stay open, and authentication has already let them in. After an early answer
  (413 before the body was read) the rest of the body is read and dropped for `LINGER`
  seconds at most, so the client can read the answer before the connection closes.
- **Connections** (TLS only; the unix socket's callers are trusted): uvicorn is handed a
  protocol that does the TLS handshake itself (`_TlsAcceptor`), so a handshake has a
  deadline and every connection counts from its first packet against its address
  (`ConnectionGuard`) until a request on it authenticates.
- **Calls**: the two calls open to anyone (the version probe, the join call) are rate
  limited per client address (`RateLimiter`, a token bucket): 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from vzkit.api.bounds import format_size
from vzkit.errors import RateLimited, RequestTimeout, ResourceExhausted, TooLarge, VzError
from vzkit.settings import Settings

log = logging.getLogger(__name__)

# Seconds the rest of a body is read and dropped after an early answer, before closing.
LINGER = 5.0
# A request's line and headers together (h11 answers 400 past it).
MAX_HEADER_BYTES = 16 * 1024
# A streamed upload checks the free space this often.
_DISK_CHECK_BYTES = 8 << 20
_SPOOL_CHUNK = 1 << 20


def server_options() -> dict[str, Any]:
    """uvicorn settings both of vzd's servers share."""
    return {
        # The guarded protocol below extends h11's (httptools, if installed, would be
        # chosen by "auto" and has no header size limit).
        "http": "h11",
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "ws_max_size": 16 * 1024 * 1024,
        "timeout_keep_alive": 30,
    }


# -- the per-route table -------------------------------------------------------------------


@dataclass(frozen=True)
class BodyLimit:
    """A route's body cap: the Settings field that holds it and the variable that sets it."""

    method: str
    path: str  # a route template: {param} matches one path segment
    setting: str
    env: str
    what: str = "the request body"
    # Streamed to disk: timed per chunk rather than in all, and kept off a full disk.
    streamed: bool = False


JOIN = BodyLimit("POST", "/1.0/trust/join", "max_join_body", "VZ_MAX_JOIN_BODY")
IMPORT = BodyLimit(
    "POST", "/1.0/import", "max_import_size", "VZ_MAX_IMPORT_SIZE", "the archive", True
)
FILE_PUSH = BodyLimit(
    "PUT", "/1.0/instances/{name}/files", "max_push_size", "VZ_MAX_PUSH_SIZE", "the file", True
)
DEFAULT = BodyLimit("*", "*", "max_body", "VZ_MAX_BODY")
BODY_LIMITS = (JOIN, IMPORT, FILE_PUSH)

# The calls anyone may make, rate limited per address for callers without credentials.
RATE_LIMITED = {
    ("GET", "/1.0"): "probe_rate",
    ("GET", "/1.0/"): "probe_rate",
    ("POST", "/1.0/trust/join"): "join_rate",
}


def _template(path: str) -> re.Pattern[str]:
    parts = re.split(r"\{[^/{}]+\}", path)
    return re.compile("[^/]+".join(re.escape(p) for p in parts) + r"\Z")


class Routes:
    """Route -> (its limit, the cap in bytes) for one daemon's settings."""

    def __init__(self, settings: Settings, limits: tuple[BodyLimit, ...] = BODY_LIMITS) -> None:
        self._table = [
            (lim, _template(lim.path), int(getattr(settings, lim.setting))) for lim in limits
        ]
        self._default = (DEFAULT, int(getattr(settings, DEFAULT.setting)))

    def match(self, method: str, path: str) -> tuple[BodyLimit, int]:
        for lim, pattern, cap in self._table:
            if lim.method == method and pattern.match(path):
                return lim, cap
        return self._default


def address_key(host: str) -> str:
    """Whom a limit counts: an IPv4 address, or an IPv6 /64 (what one host gets)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# -- rate limits ---------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key: ``per_minute`` calls at once, refilled over a minute.

    At most ``max_keys`` buckets are kept (the least recently used go first), so memory
    stays bounded whatever the number of addresses; a dropped key starts full again.
    """

    def __init__(self, per_minute: int, max_keys: int = 4096) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0.0 if a call is allowed now (and count it), else the seconds until one is."""
        if self.rate <= 0:
            return 0.0
        tokens, stamp = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + max(0.0, now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


# -- the middleware ------------------------------------------------------------------------


def free_disk(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _no_room(path: Path, free: int, reserve: int, upload: int = 0) -> ResourceExhausted:
    what = f"an upload of {format_size(upload)}" if upload else "this upload"
    return ResourceExhausted(
        f"not enough disk space for {what} in {path}: {format_size(free)} free, "
        f"and {format_size(reserve)} must stay free",
        hint="free some space on the server (or lower VZ_MIN_FREE_DISK there)",
    )


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


class RequestLimits:
    """Rate limits for anonymous callers, then each route's body cap, timeout and disk check.

    Registered inside the authentication middleware (it needs to know who calls) and
    inside request metrics (so its answers are counted and audited). ``caller`` gives
    the scope's caller; one whose ``kind`` is "anonymous" is rate limited.
    """

    def __init__(self, app: ASGIApp, settings: Settings, caller: Callable[[Scope], Any]) -> None:
        self.app = app
        self.settings = settings
        self.caller = caller
        self.routes = Routes(settings)
        self.rates = {
            name: RateLimiter(int(getattr(settings, name))) for name in set(RATE_LIMITED.values())
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # WebSockets: messages are bounded by ws_max_size; the stream has no deadline.
            await self.app(scope, receive, send)
            return
        limit, cap = self.routes.match(scope["method"], scope["path"])
        try:
            self._admit(scope, limit, cap)
        except VzError as exc:
            await _answer(send, exc)
            return
        body = _Body(self, receive, send, limit, cap)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            # The app's own reaction to a body cut short (a 400, a disconnect) is not the
            # client's answer: the limit's error is, if it can still be sent.
            if body.error is None or body.started:
                raise
        if body.error is not None and not body.started:
            await body.answer()

    def _admit(self, scope: Scope, limit: BodyLimit, cap: int) -> None:
        rate = RATE_LIMITED.get((scope["method"], scope["path"]))
        if rate is not None and getattr(self.caller(scope), "kind", None) == "anonymous":
            client = scope.get("client") or ("", 0)
            key = address_key(str(client[0]))
            wait = self.rates[rate].take(key, time.monotonic())
            if wait > 0:
                per_minute = getattr(self.settings, rate)
                raise RateLimited(
                    f"too many unauthenticated calls to {scope['path']} from {key}: "
                    f"at most {per_minute} a minute",
                    hint=f"retry in {math.ceil(wait)} s",
                    retry_after=math.ceil(wait),
                )
        length = _content_length(scope)
        if length is not None and length > cap:
            raise _too_large(limit, cap)
        if limit.streamed and length:
            free = free_disk(self.settings.state_dir)
            if free - length < self.settings.min_free_disk:
                raise _no_room(self.settings.state_dir, free, self.settings.min_free_disk, length)


def _too_large(limit: BodyLimit, cap: int) -> TooLarge:
    return TooLarge(
        f"{limit.what} is larger than {format_size(cap)}, the most "
        f"{limit.method} {limit.path} accepts"
        if limit is not DEFAULT
        else f"{limit.what} is larger than {format_size(cap)}, the most this call accepts",
        hint=f"send less; the server's limit is {limit.env}",
    )


class _Body:
    """One request's receive (counted, timed, disk-checked) and send (the limit's answer
    replaces the app's once a limit was hit)."""

    def __init__(
        self, owner: RequestLimits, receive: Receive, send: Send, limit: BodyLimit, cap: int
    ) -> None:
        self._receive = receive
        self._send = send
        self.settings = owner.settings
        self.limit = limit
        self.cap = cap
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + self.settings.body_timeout
        self.received = 0
        self.next_check = 0
        self.complete = False
        self.started = False
        self.error: VzError | None = None

    async def receive(self) -> Message:
        if self.error is not None:
            raise self.error
        if self.complete:  # waiting for a disconnect now: not timed
            return await self._receive()
        if self.limit.streamed:
            self.deadline = self.loop.time() + self.settings.body_timeout
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            wait = f"{self.settings.body_timeout:g} s"
            raise self._fail(
                RequestTimeout(
                    f"{self.limit.what} stalled: nothing came for {wait}"
                    if self.limit.streamed
                    else f"{self.limit.what} did not arrive within {wait}",
                    hint="send the body as fast as it can go, or check the network "
                    "(the server's limit is VZ_BODY_TIMEOUT)",
                )
            ) from None
        if message["type"] != "http.request":
            self.complete = True
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.cap:
            raise self._fail(_too_large(self.limit, self.cap))
        if self.limit.streamed and self.received >= self.next_check:
            self.next_check = self.received + _DISK_CHECK_BYTES
            free = free_disk(self.settings.state_dir)
            if free < self.settings.min_free_disk:
                raise self._fail(
                    _no_room(self.settings.state_dir, free, self.settings.min_free_disk)
                )
        if not message.get("more_body", False):
            self.complete = True
        return message

    def _fail(self, exc: VzError) -> VzError:
        self.error = exc
        return exc

    async def send(self, message: Message) -> None:
        if self.error is not None:
            if not self.started:
                await self.answer()
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def answer(self) -> None:
        assert self.error is not None
        self.started = True
        # A slow client's connection goes; one that sent too much may finish (or linger).
        await _answer(self._send, self.error, close=isinstance(self.error, RequestTimeout))


def _error_response(
    exc: VzError, *, close: bool = False
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(exc.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, RateLimited):
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    return headers, body


async def _answer(send: Send, exc: VzError, *, close: bool = False) -> None:
    headers, body = _error_response(exc, close=close)
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- streamed uploads ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def spooled(
    data: AsyncIterator[bytes], directory: Path
) -> AsyncIterator[AsyncIterator[bytes]]:
    """The whole of ``data`` in an unnamed file under ``directory``, then read back.

    A consumer that writes into an instance gets the bytes only once they have all come
    (within the route's cap), so an upload cut short leaves nothing half-written there.
    The file has no name (O_TMPFILE): it goes when closed, even if vzd dies.
    """
    with tempfile.TemporaryFile(dir=directory) as spool:
        buf = bytearray()
        async for chunk in data:
            buf += chunk
            if len(buf) >= _SPOOL_CHUNK:
                await asyncio.to_thread(spool.write, buf)
                buf = bytearray()
        if buf:
            await asyncio.to_thread(spool.write, buf)
        spool.seek(0)
        yield _read_back(spool)


async def _read_back(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(spool.read, _SPOOL_CHUNK):
        yield chunk


# -- the HTTP protocol: header timeout, linger ---------------------------------------------


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and a bounded
    linger after an answer given before the request's body was all read."""

    header_timeout: ClassVar[float] = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    _partial = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._partial = True
            if self._header_timer is None:
                self._arm()
        super().data_received(data)

    def _awaiting_headers(self) -> bool:
        # h11 leaves IDLE when a request's headers are complete, and comes back to it once
        # the request and its answer are done (keep-alive: uvicorn's own timeout then).
        return self.conn.their_state is h11.IDLE

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers():
            return
        if self._partial:
            exc = RequestTimeout(
                f"the request headers did not arrive within {self.header_timeout:g} s",
                hint="send the whole request at once (the server's limit is VZ_HEADER_TIMEOUT)",
            )
            headers, body = _error_response(exc, close=True)
            head = b"HTTP/1.1 408 Request Timeout\r\n" + b"".join(
                k + b": " + v + b"\r\n" for k, v in headers
            )
            self.transport.write(head + b"\r\n" + body)
        self.transport.close()

    def on_response_complete(self) -> None:
        self._cancel("_header_timer")
        self._partial = False
        # An answer before the whole body came (413 on Content-Length, a route that does
        # not read its body): h11 drops the rest as it comes, for LINGER seconds at most.
        cycle = self.cycle
        unread = self.conn.their_state is h11.SEND_BODY
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            self._cancel("_linger_timer")
            self._linger_timer = self.loop.call_later(LINGER, self._linger_over, cycle)

    def _linger_over(self, cycle: Any) -> None:
        self._linger_timer = None
        if self.cycle is cycle and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The transport is the WebSocket's from here on: nothing of ours may close it.
        self._cancel("_header_timer")
        self._cancel("_linger_timer")
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel("_header_timer")
        self._cancel("_linger_timer")
        super().connection_lost(exc)

    def _cancel(self, name: str) -> None:
        timer: asyncio.TimerHandle | None = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)


def guard_http(config: Any, settings: Settings) -> None:
    """Give a uvicorn config's (loaded, h11) protocol the header timeout and the linger."""
    if not config.loaded:
        config.load()
    base = config.http_protocol_class
    if not issubclass(base, H11Protocol):
        raise TypeError(f"{base.__name__} is not uvicorn's h11 protocol: use server_options()")
    config.http_protocol_class = type(
        f"VzGuarded{base.__name__}",
        (_GuardedH11, base),
        {"header_timeout": settings.header_timeout},
    )


# -- TLS: handshake deadline and unauthenticated connections per address --------------------


class _Connection(Protocol):
    def is_closing(self) -> bool: ...


class ConnectionGuard:
    """Live TLS connections per client address that have not authenticated (yet).

    A connection counts from its first packet (its handshake included) until it closes or
    a request on it authenticates (`vouch`); an address at the cap gets no more. Closed
    connections are noticed on the address's next connection, so nothing needs to be told.
    """

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._open: dict[str, dict[tuple[str, int], _Connection]] = {}
        self._warned: dict[str, float] = {}
        self._admitted = 0
        self.pending: set[asyncio.Task[None]] = set()

    def admit(self, peer: Any, transport: _Connection) -> bool:
        if not isinstance(peer, tuple) or len(peer) < 2:
            return True
        self._admitted += 1
        if self._admitted % 256 == 0:
            for key in list(self._open):
                self._prune(key)
        key = address_key(str(peer[0]))
        live = self._prune(key)
        if len(live) >= self.per_address:
            self._refused(key)
            return False
        self._open.setdefault(key, {})[(str(peer[0]), int(peer[1]))] = transport
        return True

    def _prune(self, key: str) -> dict[tuple[str, int], _Connection]:
        live = {p: t for p, t in self._open.get(key, {}).items() if not t.is_closing()}
        if live:
            self._open[key] = live
        else:
            self._open.pop(key, None)
        return live

    def _refused(self, key: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -math.inf) > 60:
            if len(self._warned) > 1024:
                self._warned.clear()
            self._warned[key] = now
            log.warning(
                "refusing TLS connections from %s: %d unauthenticated ones are open "
                "(VZ_MAX_ANON_CONNECTIONS)",
                key,
                self.per_address,
            )

    def vouch(self, client: Any) -> None:
        """The connection of this scope's client authenticated: it no longer counts."""
        if isinstance(client, list | tuple) and len(client) == 2:
            key = address_key(str(client[0]))
            self._open.get(key, {}).pop((str(client[0]), int(client[1])), None)

    def count(self, host: str) -> int:
        return len(self._prune(address_key(host)))

    def abort_pending(self) -> None:
        """Stop handshakes in progress (the listener is going away)."""
        for task in list(self.pending):
            task.cancel()


class _TlsAcceptor(asyncio.Protocol):
    """uvicorn's protocol for a TLS listener whose uvicorn config has no SSL context: it
    counts the connection, does the handshake (with a deadline), then hands the TLS
    transport to the real HTTP protocol, with any bytes that came along."""

    inner: ClassVar[Callable[..., asyncio.Protocol]]
    context: ClassVar[ssl.SSLContext]
    guard: ClassVar[ConnectionGuard]
    timeout: ClassVar[float]

    def __init__(self, **kw: Any) -> None:
        self._kw = kw
        self._loop: asyncio.AbstractEventLoop = kw.get("_loop") or asyncio.get_event_loop()
        self._early = bytearray()
        self._lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.guard.admit(transport.get_extra_info("peername"), transport):
            transport.abort()
            return
        task = self._loop.create_task(self._handshake(transport))
        self.guard.pending.add(task)
        task.add_done_callback(self.guard.pending.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        try:
            tls = await self._loop.start_tls(
                transport,
                self,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.timeout,
                ssl_shutdown_timeout=self.timeout,
            )
        except (OSError, EOFError) as exc:  # ssl.SSLError, a reset, the deadline
            log.debug("TLS handshake failed: %s", exc)
            transport.abort()
            return
        if tls is None or self._lost:
            transport.abort()
            return
        proto = self.inner(**self._kw)
        tls.set_protocol(proto)
        proto.connection_made(tls)
        if self._early:
            proto.data_received(bytes(self._early))

    # Between the handshake and the hand-over (one loop turn), the request may arrive.
    def data_received(self, data: bytes) -> None:
        self._early += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True


def serve_tls(config: Any, settings: Settings, guard: ConnectionGuard) -> None:
    """Move a loaded uvicorn config's TLS into `_TlsAcceptor` (after `guard_http`)."""
    assert config.loaded and config.ssl is not None
    acceptor = type(
        "VzTlsAcceptor",
        (_TlsAcceptor,),
        {
            "inner": config.http_protocol_class,
            "context": config.ssl,
            "guard": guard,
            "timeout": settings.tls_handshake_timeout,
        },
    )
    config.ssl = None  # uvicorn's listener is plain TCP now; the acceptor does TLS
    config.http_protocol_class = acceptor
