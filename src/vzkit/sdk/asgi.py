"""An in-memory transport: the SDK calls an ASGI app in this process, without a socket.

Route tests run the real FastAPI app of vzd through a real :class:`vzkit.sdk.client.Client`
with it: plain requests, streamed request and answer bodies (file pushes, NDJSON progress,
exports) and WebSockets (exec, console, events). The app runs on an event loop in a thread
of its own, as under a server, so the synchronous client can block on it; answers stream
through thread-safe queues as the app sends them.

Like a server, a disconnect is reported to the app only once the client is done with the
answer (read to its end or closed), and an exception the app raises after it answered is
kept in :attr:`ASGITransport.app_errors` rather than raised; one it raises before answering
is raised in the caller (``raise_app_exceptions``, as in httpx).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import Future
from types import TracebackType
from typing import IO, Any, Self, overload
from urllib.parse import unquote

from vzkit.errors import DaemonUnavailable
from vzkit.sdk._api import error_from_response
from vzkit.sdk.transport import Body, Response, WebSocket

__all__ = ["ASGITransport"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CHUNK = 64 * 1024
_END = object()


class ASGITransport:
    """Calls ``app`` in-process. ``client`` is the scope's peer: by default this process's
    uid, as vzd's unix socket reports a local caller. ``lifespan`` runs the app's start-up
    now and its shut-down on :meth:`close`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: tuple[str, int] | None = None,
        lifespan: bool = False,
        raise_app_exceptions: bool = True,
    ) -> None:
        self.app = app
        self.client = client or (f"uid={os.getuid()}", os.getpid())
        self.raise_app_exceptions = raise_app_exceptions
        self.app_errors: list[BaseException] = []
        self._state: dict[str, Any] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vz-asgi", daemon=True)
        self._thread.start()
        self._lifespan: _Lifespan | None = None
        if lifespan:
            self._lifespan = _Lifespan(self)
            self._lifespan.startup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the transport --------------------------------------------------------------------

    def unavailable(self, why: str = "") -> DaemonUnavailable:
        return DaemonUnavailable(
            f"the in-process app is unavailable{': ' + why if why else ''}",
            hint="the transport was closed",
        )

    def reachable(self) -> bool:
        return self._loop.is_running()

    def request(
        self, method: str, url: str, *, body: Body = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        if not self._loop.is_running():
            raise self.unavailable()
        answer = _Answer(self._loop)
        scope = self._scope("http", url, headers, method=method.upper())
        future = self._submit(self._serve_http(scope, body, answer))
        answer.wait_started(future, self.raise_app_exceptions)
        return answer

    def websocket(self, url: str, *, headers: Mapping[str, str] | None = None) -> WebSocket:
        if not self._loop.is_running():
            raise self.unavailable()
        ws = _Socket(self._loop)
        scope = self._scope("websocket", url, headers, subprotocols=[])
        scope["extensions"] = {"websocket.http.response": {}}
        future = self._submit(self._serve_ws(scope, ws))
        ws.wait_accepted(future, self.raise_app_exceptions)
        return ws

    def close(self) -> None:
        if not self._loop.is_running():
            return
        if self._lifespan is not None:
            self._lifespan.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # -- plumbing -------------------------------------------------------------------------

    def _submit(self, work: Awaitable[None]) -> Future[None]:
        async def run() -> None:
            await work

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def _scope(self, kind: str, url: str, headers: Mapping[str, str] | None, **extra: Any) -> Scope:
        path, _, query = url.partition("?")
        hdrs = {"host": "vzd", **{k.lower(): v for k, v in (headers or {}).items()}}
        return {
            "type": kind,
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "http" if kind == "http" else "ws",
            "path": unquote(path),
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()],
            "client": self.client,
            "server": ("vzd", 0),
            "state": dict(self._state),
            **extra,
        }

    async def _serve_http(self, scope: Scope, body: Body, answer: _Answer) -> None:
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                chunk, more = await _next_chunk(body)
                sent_body = not more
                return {"type": "http.request", "body": chunk, "more_body": more}
            await answer.done.wait()  # a server reports a disconnect only when it happens
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            answer.take(message)

        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            if not answer.started.is_set():
                answer.fail(exc)
                return
            self.app_errors.append(exc)  # answered already: a server would log it
        finally:
            answer.finish()

    async def _serve_ws(self, scope: Scope, ws: _Socket) -> None:
        try:
            await self.app(scope, ws.receive_from_client, ws.take)
        except BaseException as exc:
            if not ws.opened.is_set():
                ws.fail(exc)
                return
            self.app_errors.append(exc)
        finally:
            ws.app_ended()


async def _next_chunk(body: Body) -> tuple[bytes, bool]:
    """The next piece of a request body and whether more follows."""
    if body is None or isinstance(body, bytes):
        return body or b"", False
    stream: IO[bytes] = body
    chunk = await asyncio.to_thread(stream.read, _CHUNK)
    return chunk or b"", bool(chunk)


class _Answer:
    """The app's answer as the client reads it: status and headers, then body chunks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.status = 0
        self._headers: dict[str, str] = {}
        self.started = threading.Event()
        self.done = asyncio.Event()  # set on the loop: the client is done with the answer
        self._chunks: queue.Queue[Any] = queue.Queue()
        self._buffer = b""
        self._eof = False
        self._error: BaseException | None = None

    # app side (on the loop)

    def take(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self._headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in message.get("headers", [])
            }
            self.started.set()
        elif message["type"] == "http.response.body":
            if message.get("body"):
                self._chunks.put(bytes(message["body"]))
            if not message.get("more_body", False):
                self._chunks.put(_END)

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self.started.set()

    def finish(self) -> None:
        self._chunks.put(_END)  # harmless after the last body message
        self.started.set()

    # client side

    def wait_started(self, future: Future[None], raise_app_exceptions: bool) -> None:
        self.started.wait()
        if self._error is not None:
            if raise_app_exceptions:
                raise self._error
            self.status = 500
            self._chunks.put(_END)
        elif self.status == 0:
            future.result()  # the app ended without answering
            self.status = 500

    @overload
    def getheader(self, name: str, /) -> str | None: ...
    @overload
    def getheader(self, name: str, default: str, /) -> str: ...
    def getheader(self, name: str, default: str | None = None, /) -> str | None:
        return self._headers.get(name.lower(), default)

    def _fill(self) -> bool:
        """Wait for one more chunk; False at the end of the body."""
        if self._eof:
            return False
        item = self._chunks.get()
        if item is _END:
            self._eof = True
            self._loop.call_soon_threadsafe(self.done.set)
            return False
        self._buffer += item
        return True

    def read(self, amt: int | None = None, /) -> bytes:
        while (amt is None or len(self._buffer) < amt) and self._fill():
            pass
        n = len(self._buffer) if amt is None else amt
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def read1(self, n: int = -1, /) -> bytes:
        if not self._buffer:
            self._fill()
        n = len(self._buffer) if n < 0 else n
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def readline(self, limit: int = -1, /) -> bytes:
        while b"\n" not in self._buffer and (limit < 0 or len(self._buffer) < limit):
            if not self._fill():
                break
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        if limit >= 0:
            end = min(end, limit)
        line, self._buffer = self._buffer[:end], self._buffer[end:]
        return line

    def close(self) -> None:
        self._eof = True
        self._loop.call_soon_threadsafe(self.done.set)


class _Socket:
    """One WebSocket session with the app: its messages through two queues."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._to_client: queue.Queue[Message] = queue.Queue()
        self.opened = threading.Event()  # accepted, refused, or failed
        self._accepted = False
        self._denial: tuple[int, bytes] | None = None
        self._error: BaseException | None = None
        self._closed: tuple[int, str] | None = None
        self._to_app.put_nowait({"type": "websocket.connect"})

    # app side (on the loop)

    async def receive_from_client(self) -> Message:
        return await self._to_app.get()

    async def take(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self._accepted = True
            self.opened.set()
        elif kind == "websocket.http.response.start":
            self._denial = (int(message["status"]), b"")
        elif kind == "websocket.http.response.body" and self._denial is not None:
            self._denial = (self._denial[0], self._denial[1] + bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self.opened.set()
        else:
            self._to_client.put(dict(message))
            if kind == "websocket.close":
                self.opened.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self.opened.set()

    def app_ended(self) -> None:
        self._to_client.put({"type": "websocket.close", "code": 1006, "reason": ""})
        self.opened.set()

    # client side

    def wait_accepted(self, future: Future[None], raise_app_exceptions: bool) -> None:
        from websockets.exceptions import InvalidHandshake

        self.opened.wait()
        if self._error is not None:
            if raise_app_exceptions:
                raise self._error
            raise InvalidHandshake(f"the app failed before accepting: {self._error!r}")
        if self._denial is not None:
            raise error_from_response(*self._denial)
        if not self._accepted:
            close = self._to_client.get()
            raise InvalidHandshake(f"the app refused the WebSocket (close {close.get('code')})")

    def send(self, message: str | bytes, /) -> None:
        if self._closed is not None:
            raise self._closed_error()
        event: Message = {"type": "websocket.receive"}
        event["bytes" if isinstance(message, bytes) else "text"] = message
        self._loop.call_soon_threadsafe(self._to_app.put_nowait, event)

    def recv(self) -> str | bytes:
        if self._closed is not None:
            raise self._closed_error()
        message = self._to_client.get()
        if message["type"] == "websocket.close":
            self._closed = (int(message.get("code", 1000)), str(message.get("reason") or ""))
            raise self._closed_error()
        data: str | bytes | None = message.get("bytes")
        return data if data is not None else str(message.get("text", ""))

    def close(self) -> None:
        if self._closed is None:
            self._closed = (1000, "")
            event = {"type": "websocket.disconnect", "code": 1000}
            self._loop.call_soon_threadsafe(self._to_app.put_nowait, event)

    def _closed_error(self) -> Exception:
        from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
        from websockets.frames import Close

        assert self._closed is not None
        code, reason = self._closed
        frame = Close(code, reason) if code != 1006 else None
        if code in (1000, 1001):
            return ConnectionClosedOK(frame, frame, True)
        return ConnectionClosedError(frame, frame, True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None:
        self.close()


class _Lifespan:
    """The app's lifespan protocol: start-up when the transport opens, shut-down at close."""

    def __init__(self, transport: ASGITransport) -> None:
        self._transport = transport
        self._loop = transport._loop
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: queue.Queue[Message] = queue.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": transport._state}

        async def receive() -> Message:
            return await self._inbox.get()

        async def send(message: Message) -> None:
            self._outbox.put(dict(message))

        async def run() -> None:
            try:
                await transport.app(scope, receive, send)
            except BaseException as exc:
                self._outbox.put({"type": "lifespan.error", "message": repr(exc)})

        asyncio.run_coroutine_threadsafe(run(), self._loop)

    def _step(self, kind: str) -> None:
        self._loop.call_soon_threadsafe(self._inbox.put_nowait, {"type": f"lifespan.{kind}"})
        answer = self._outbox.get()
        if answer["type"] != f"lifespan.{kind}.complete":
            raise RuntimeError(f"the app's lifespan {kind} failed: {answer.get('message')}")

    def startup(self) -> None:
        self._step("startup")

    def shutdown(self) -> None:
        self._step("shutdown")
