"""The request limits' logic, without a server: the route table, the token bucket, the
connection guard, the spool, and the ASGI middleware driven by a scripted client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.types import Message, Receive, Scope, Send

from vzkit.errors import InvalidConfig
from vzkit.server import limits
from vzkit.server.limits import (
    ConnectionGuard,
    RateLimiter,
    RequestLimits,
    Routes,
    address_key,
    spooled,
)
from vzkit.settings import Settings

App = Callable[[Scope, Receive, Send], Awaitable[None]]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(
        Settings(),
        state_dir=tmp_path,
        max_body=100,
        max_join_body=10,
        max_push_size=1000,
        max_import_size=2000,
        min_free_disk=0,
        body_timeout=0.2,
        join_rate=2,
        probe_rate=3,
    )


# -- the table, the bucket, the guard -----------------------------------------------------


def test_routes_match_templates_and_fall_back_to_the_default(settings: Settings) -> None:
    routes = Routes(settings)
    assert routes.match("POST", "/1.0/trust/join") == (limits.JOIN, 10)
    assert routes.match("PUT", "/1.0/instances/web/files") == (limits.FILE_PUSH, 1000)
    assert routes.match("POST", "/1.0/import") == (limits.IMPORT, 2000)
    # One segment per parameter, the method counts, nothing but a whole path matches.
    for method, path in [
        ("PUT", "/1.0/instances/a/b/files"),
        ("GET", "/1.0/instances/web/files"),
        ("POST", "/1.0/import/x"),
        ("POST", "/1.0/trust/join/"),
    ]:
        assert routes.match(method, path) == (limits.DEFAULT, 100), (method, path)


def test_address_key_groups_an_ipv6_host_by_its_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert (
        address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    )
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("uid=0") == "uid=0"


def test_rate_limiter_allows_a_burst_then_refills_over_a_minute() -> None:
    rl = RateLimiter(per_minute=3)
    assert [rl.take("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("a", 100.0)
    assert wait == pytest.approx(20.0)  # one token per 20 s
    assert rl.take("b", 100.0) == 0.0  # per key
    assert rl.take("a", 120.5) == 0.0  # refilled
    assert rl.take("a", 120.5) > 0
    assert RateLimiter(per_minute=0).take("a", 0.0) == 0.0  # 0: off


def test_rate_limiter_keeps_a_bounded_number_of_keys() -> None:
    rl = RateLimiter(per_minute=1, max_keys=10)
    for i in range(1000):
        rl.take(f"k{i}", 0.0)
    assert len(rl._buckets) == 10


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


def test_connection_guard_caps_unauthenticated_connections_per_address() -> None:
    guard = ConnectionGuard(per_address=2)
    a, b, c = _Transport(), _Transport(), _Transport()
    assert guard.admit(("192.0.2.1", 1), a) and guard.admit(("192.0.2.1", 2), b)
    assert not guard.admit(("192.0.2.1", 3), c)
    assert guard.admit(("192.0.2.9", 1), _Transport())  # another address
    a.closing = True  # noticed on the next connection
    assert guard.admit(("192.0.2.1", 3), c)
    guard.vouch(("192.0.2.1", 3))  # authenticated: no longer counts
    assert guard.count("192.0.2.1") == 1
    assert guard.admit(("192.0.2.1", 4), _Transport())
    assert guard.admit("not-a-tuple", _Transport())  # a unix peer: nothing to count


def test_settings_refuse_malformed_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [
        ("VZ_MAX_BODY", "lots"),
        ("VZ_MAX_BODY", "-1"),
        ("VZ_BODY_TIMEOUT", "0"),
        ("VZ_HEADER_TIMEOUT", "nan"),
        ("VZ_JOIN_RATE", "1.5"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(InvalidConfig) as exc:
                Settings()
            assert name in exc.value.message
    monkeypatch.setenv("VZ_MAX_IMPORT_SIZE", "3GiB")
    assert Settings().max_import_size == 3 << 30


def test_spooled_hands_over_everything_and_leaves_no_file(tmp_path: Path) -> None:
    async def source() -> AsyncIterator[bytes]:
        for i in range(40):
            yield bytes([i]) * 100_000

    async def run() -> bytes:
        out = bytearray()
        async with spooled(source(), tmp_path) as body:
            async for chunk in body:
                out += chunk
        return bytes(out)

    data = asyncio.run(run())
    assert data == b"".join(bytes([i]) * 100_000 for i in range(40))
    assert os.listdir(tmp_path) == []


def test_spooled_cut_short_leaves_no_file(tmp_path: Path) -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"x" * 3_000_000
        raise RuntimeError("the client went away")

    async def run() -> None:
        async with spooled(source(), tmp_path):
            raise AssertionError("not reached")

    with pytest.raises(RuntimeError):
        asyncio.run(run())
    assert os.listdir(tmp_path) == []


# -- the middleware ------------------------------------------------------------------------


@dataclasses.dataclass
class _Caller:
    kind: str


def _scope(method: str, path: str, *, length: int | None = None, kind: str = "unix") -> Scope:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers,
        "client": ("192.0.2.5", 4000),
        "caller": _Caller(kind),
    }


def _body_reader(seen: list[bytes]) -> App:
    """An app that reads the whole body, then answers 200; like FastAPI, it turns an error
    while reading into its own 400."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while True:
                msg = await receive()
                seen.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
        except Exception:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"error parsing the body"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _drive(
    app: App, settings: Settings, scope: Scope, chunks: list[bytes | float]
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Run the middleware over ``app`` with a client that sends ``chunks`` (a float: a pause
    of that many seconds); the answer's status, headers and body."""
    sent: list[Message] = []

    async def run() -> None:
        queue = list(chunks)

        async def receive() -> Message:
            while queue and isinstance(queue[0], float):
                await asyncio.sleep(float(queue.pop(0)))
            if not queue:
                await asyncio.sleep(3600)
            body = queue.pop(0)
            assert isinstance(body, bytes)
            return {"type": "http.request", "body": body, "more_body": bool(queue)}

        async def send(message: Message) -> None:
            sent.append(message)

        mw = RequestLimits(app, settings, caller=lambda s: s.get("caller"))
        await asyncio.wait_for(mw(scope, receive, send), 10)

    asyncio.run(run())
    start = [m for m in sent if m["type"] == "http.response.start"]
    assert len(start) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start[0]["status"], dict(start[0]["headers"]), body


def _code(body: bytes) -> str:
    err = json.loads(body)
    assert err["hint"]
    return str(err["code"])


def test_a_declared_length_over_the_cap_is_refused_unread(settings: Settings) -> None:
    seen: list[bytes] = []
    status, _, body = _drive(
        _body_reader(seen), settings, _scope("POST", "/1.0/networks", length=101), [b"x" * 101]
    )
    assert (status, _code(body), seen) == (413, "too_large", [])
    # Each route its own cap.
    status, _, body = _drive(
        _body_reader(seen), settings, _scope("POST", "/1.0/trust/join", length=11), [b"x"]
    )
    assert status == 413 and "VZ_MAX_JOIN_BODY" in json.loads(body)["hint"]
    status, _, _ = _drive(
        _body_reader(seen), settings, _scope("PUT", "/1.0/instances/a/files", length=900), [b"x"]
    )
    assert status == 200


def test_a_chunked_body_is_cut_at_the_cap_and_the_apps_answer_replaced(settings: Settings) -> None:
    seen: list[bytes] = []
    status, _, body = _drive(
        _body_reader(seen), settings, _scope("POST", "/1.0/networks"), [b"x" * 60] * 10
    )
    assert (status, _code(body)) == (413, "too_large")
    assert sum(map(len, seen)) <= 100  # the app never saw more than the cap
    status, _, body = _drive(
        _body_reader([]), settings, _scope("POST", "/1.0/networks"), [b"x" * 99]
    )
    assert (status, body) == (200, b"ok")


def test_a_small_body_has_a_deadline_in_all(settings: Settings) -> None:
    # Every chunk comes within the timeout, the whole body does not.
    chunks: list[bytes | float] = [b"{", 0.08, b" ", 0.08, b" ", 0.08, b" ", 0.08, b"}"]
    status, headers, body = _drive(
        _body_reader([]), settings, _scope("POST", "/1.0/networks"), chunks
    )
    assert (status, _code(body)) == (408, "timeout")
    assert headers[b"connection"] == b"close"


def test_a_streamed_body_is_timed_per_chunk(settings: Settings) -> None:
    scope = _scope("PUT", "/1.0/instances/a/files")
    # Longer in all than the timeout, but no gap comes near it.
    patient = dataclasses.replace(settings, body_timeout=2.0)
    chunks: list[bytes | float] = [b"x", 0.5, b"x", 0.5, b"x", 0.5, b"x", 0.5, b"x", 0.5, b"x"]
    assert _drive(_body_reader([]), patient, scope, chunks)[0] == 200
    status, _, body = _drive(_body_reader([]), settings, scope, [b"x", 0.5, b"x"])
    assert (status, _code(body)) == (408, "timeout")


def test_a_streamed_body_keeps_the_free_space(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = {"now": 10_000}
    monkeypatch.setattr(limits, "free_disk", lambda path: free["now"])
    tight = dataclasses.replace(settings, min_free_disk=9_500)
    scope = _scope("POST", "/1.0/import", length=600)
    status, _, body = _drive(_body_reader([]), tight, scope, [b"x" * 600])
    assert (status, _code(body)) == (507, "resource_exhausted")
    assert "VZ_MIN_FREE_DISK" in json.loads(body)["hint"]
    # Chunked: checked as it comes.
    free["now"] = 9_000
    status, _, body = _drive(_body_reader([]), tight, _scope("POST", "/1.0/import"), [b"x" * 10])
    assert (status, _code(body)) == (507, "resource_exhausted")
    # JSON bodies are not stored: no check.
    assert _drive(_body_reader([]), tight, _scope("POST", "/1.0/networks"), [b"{}"])[0] == 200


def test_anonymous_probes_and_joins_are_rate_limited(settings: Settings) -> None:
    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def call(mw: RequestLimits, scope: Scope) -> tuple[int, dict[bytes, bytes]]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        asyncio.run(mw(scope, receive, send))
        return sent[0]["status"], dict(sent[0]["headers"])

    mw = RequestLimits(ok, settings, caller=lambda s: s.get("caller"))
    anon = _scope("GET", "/1.0", kind="anonymous")
    assert [call(mw, anon)[0] for _ in range(3)] == [200, 200, 200]
    status, headers = call(mw, anon)
    assert status == 429 and 0 < int(headers[b"retry-after"]) <= 20
    assert call(mw, _scope("GET", "/1.0", kind="token"))[0] == 200
    assert call(mw, _scope("GET", "/1.0/instances", kind="anonymous"))[0] == 200  # not limited
    join = _scope("POST", "/1.0/trust/join", kind="anonymous")
    assert [call(mw, join)[0] for _ in range(3)] == [200, 200, 429]


def test_websockets_pass_untouched(settings: Settings) -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((receive, send))

    async def receive() -> Message:
        return {}

    async def send(message: Message) -> None:
        pass

    mw = RequestLimits(app, settings, caller=lambda s: None)
    asyncio.run(mw({"type": "websocket", "path": "/1.0/events", "headers": []}, receive, send))
    assert seen == [(receive, send)]


def test_after_the_body_receive_is_not_timed(settings: Settings) -> None:
    """A streaming answer waits for the client's disconnect as long as it streams."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["more_body"] is False
        await send({"type": "http.response.start", "status": 200, "headers": []})
        msg = await receive()  # the disconnect, long after the body timeout
        await send({"type": "http.response.body", "body": msg["type"].encode()})

    async def run() -> bytes:
        calls = 0

        async def receive() -> Message:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(0.5)
            return {"type": "http.disconnect"}

        out: list[Message] = []

        async def send(message: Message) -> None:
            out.append(message)

        await RequestLimits(app, settings, caller=lambda s: None)(
            _scope("GET", "/1.0/events"), receive, send
        )
        return bytes(out[-1]["body"])

    assert asyncio.run(run()) == b"http.disconnect"


# -- the h11 protocol: header deadline and linger ------------------------------------------


class _FakeTransport:
    """What uvicorn's h11 protocol uses of an asyncio transport."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.5", 4000), "sockname": ("192.0.2.1", 80)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args: Any) -> None:
        pass


def _protocol(app: App, header_timeout: float) -> tuple[Any, _FakeTransport]:
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(app, lifespan="off", log_level="warning", **limits.server_options())
    config.load()
    settings = dataclasses.replace(Settings(), header_timeout=header_timeout)
    limits.guard_http(config, settings)
    proto = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}
    )
    transport = _FakeTransport()
    proto.connection_made(cast(asyncio.Transport, transport))
    return proto, transport


async def _answer_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_headers_too_slow_get_a_408_and_the_connection_closes() -> None:
    async def run() -> _FakeTransport:
        proto, transport = _protocol(_answer_at_once, header_timeout=0.2)
        proto.data_received(b"GET /1.0 HTTP/1.1\r\nHost: vzd\r\nX-Slow: a")
        await asyncio.sleep(0.6)
        return transport

    transport = asyncio.run(run())
    assert transport.closed
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head
    assert json.loads(body)["code"] == "timeout"


def test_a_connection_that_sends_nothing_is_closed_silently() -> None:
    async def run() -> _FakeTransport:
        _, transport = _protocol(_answer_at_once, header_timeout=0.2)
        await asyncio.sleep(0.6)
        return transport

    transport = asyncio.run(run())
    assert transport.closed and transport.written == b""


def test_headers_in_time_are_served_and_keep_alive_is_not_cut() -> None:
    async def run() -> _FakeTransport:
        proto, transport = _protocol(_answer_at_once, header_timeout=0.2)
        proto.data_received(b"GET /1.0 HTTP/1.1\r\nHost: vzd\r\n\r\n")
        await asyncio.sleep(0.6)  # idle after the answer: uvicorn's keep-alive (30 s) rules
        return transport

    transport = asyncio.run(run())
    assert transport.written.startswith(b"HTTP/1.1 200 ") and not transport.closed


def test_the_rest_of_a_body_answered_early_is_dropped_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "LINGER", 1.0)

    async def run() -> tuple[_FakeTransport, bool]:
        proto, transport = _protocol(_answer_at_once, header_timeout=5)
        proto.data_received(
            b"POST /1.0/x HTTP/1.1\r\nHost: vzd\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(3):
            await asyncio.sleep(0)  # the app answers without reading the body
        for _ in range(3):
            proto.data_received(b"10\r\n" + b"x" * 16 + b"\r\n")
        open_while_lingering = not transport.closed
        await asyncio.sleep(1.5)
        return transport, open_while_lingering

    transport, lingered = asyncio.run(run())
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    assert lingered and transport.closed
