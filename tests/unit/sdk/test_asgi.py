"""The in-memory transport: a real Client calling a FastAPI app in this process, no socket.

The app here stands in for vzd's routes with the same shapes (JSON, streamed request and
answer bodies, NDJSON progress, WebSockets, ErrorBody answers, a refused upgrade), so the
transport is held to everything the SDK does over a socket.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.unit.cli.vz_fake_daemon import IMAGE, INSTANCE, SERVER_INFO
from vzkit.api.instances import ImageInfo, Instance
from vzkit.errors import Forbidden, NotFound, VzError
from vzkit.sdk.asgi import ASGITransport
from vzkit.sdk.client import Client

GATE_TIMEOUT = 30.0


class Refuse:
    """Refuses one WebSocket path before the app sees it, as vzd's auth middleware does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith("/1.0/instances/denied"):
            await receive()
            body = json.dumps({"error": "not for you", "code": "forbidden", "hint": "h"}).encode()
            start = {"type": "websocket.http.response.start", "status": 403, "headers": []}
            await send(start)
            await send({"type": "websocket.http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class Vzd:
    """The stand-in app and what it saw."""

    def __init__(self) -> None:
        self.pushed: list[bytes] = []
        self.scopes: list[dict[str, Any]] = []
        self.first_progress_seen = threading.Event()
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.exception_handler(VzError)
        async def _vz_error(request: Request, exc: VzError) -> JSONResponse:
            return JSONResponse(exc.to_dict(), status_code=exc.http_status)

        @app.get("/1.0")
        async def info(request: Request) -> dict[str, Any]:
            self.scopes.append(dict(request.scope))
            return SERVER_INFO

        @app.get("/1.0/instances/{name}")
        async def get_instance(name: str) -> dict[str, Any]:
            if name != "web":
                raise NotFound(f"instance {name!r} not found", hint="vz list")
            return INSTANCE

        @app.put("/1.0/instances/{name}/files", status_code=204)
        async def push(name: str, request: Request, path: str, mode: str) -> Response:
            self.pushed.append(b"".join([chunk async for chunk in request.stream()]))
            return Response(status_code=204)

        @app.get("/1.0/instances/{name}/files")
        async def pull(name: str, path: str) -> StreamingResponse:
            async def chunks() -> AsyncIterator[bytes]:
                for i in range(4):
                    yield bytes([i]) * 100_000

            return StreamingResponse(chunks(), headers={"X-Vz-File-Mode": "0750"})

        @app.post("/1.0/images/{name}/build")
        async def build(name: str) -> StreamingResponse:
            async def lines() -> AsyncIterator[bytes]:
                yield b'{"progress": {"step": "kernel", "fraction": 0.5}}\n'
                # The client must have seen the first line before the app goes on: the
                # answer streams, it is not collected first.
                seen = await asyncio.to_thread(self.first_progress_seen.wait, GATE_TIMEOUT)
                if seen:
                    yield json.dumps({"image": IMAGE}).encode() + b"\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError("a bug")

        @app.websocket("/1.0/instances/{name}/exec")
        async def exec_ws(ws: WebSocket, name: str) -> None:
            await ws.accept()
            request = json.loads(await ws.receive_text())
            got = b""
            while (msg := await ws.receive_bytes()) != b"\x00":
                got += msg[1:]
            await ws.send_bytes(b"\x01" + got.upper())
            await ws.send_text(json.dumps({"exit_code": len(request["argv"])}))
            await ws.close()

        @app.websocket("/1.0/events")
        async def events(ws: WebSocket) -> None:
            await ws.accept()
            for i in range(3):
                event = {"type": "instance-state", "time": "2024-01-01T00:00:00Z", "data": {"n": i}}
                await ws.send_text(json.dumps(event))
            await ws.close()

        return app


@pytest.fixture
def vzd() -> Vzd:
    return Vzd()


@pytest.fixture
def transport(vzd: Vzd) -> Iterator[ASGITransport]:
    t = ASGITransport(Refuse(vzd.app))
    yield t
    t.close()


@pytest.fixture
def client(transport: ASGITransport) -> Iterator[Client]:
    with Client(transport=transport) as c:
        yield c


def test_plain_calls_and_typed_answers(vzd: Vzd, client: Client) -> None:
    assert client.server_info().auth == "trusted"
    inst = client.get_instance("web")
    assert isinstance(inst, Instance) and inst.pid == 4242
    with pytest.raises(NotFound, match="'ghost' not found") as info:
        client.get_instance("ghost")
    assert info.value.hint == "vz list"
    # The caller looks local, as on vzd's unix socket.
    assert str(vzd.scopes[0]["client"][0]).startswith("uid=")


def test_request_bodies_are_streamed_in(vzd: Vzd, client: Client) -> None:
    client.push_file("web", "/a", b"bytes")
    data = bytes(range(256)) * 2000
    client.push_file("web", "/b", io.BytesIO(data))
    assert vzd.pushed == [b"bytes", data]


def test_answers_stream_out(client: Client) -> None:
    mode, chunks = client.pull_file("web", "/f")
    assert mode == 0o750
    assert b"".join(chunks) == b"".join(bytes([i]) * 100_000 for i in range(4))
    # Abandoned half-read: the next call still works.
    _, chunks = client.pull_file("web", "/f")
    next(chunks)
    assert client.get_instance("web").name == "web"


def test_progress_arrives_while_the_app_is_still_working(vzd: Vzd, client: Client) -> None:
    steps: list[tuple[str, float | None]] = []

    def progress(step: str, fraction: float | None) -> None:
        steps.append((step, fraction))
        vzd.first_progress_seen.set()

    info = client.build_image("minimal", progress=progress)
    assert isinstance(info, ImageInfo) and info.name == "minimal"
    assert steps == [("kernel", 0.5)]


def test_websockets(client: Client) -> None:
    result, out, err = client.exec_capture("web", ["tr", "a-z", "A-Z"], stdin=b"hello")
    assert (result.exit_code, out, err) == (3, b"HELLO", b"")
    assert [e.data["n"] for e in client.events()] == [0, 1, 2]


def test_a_refused_upgrade_is_its_error(client: Client) -> None:
    with pytest.raises(Forbidden, match="not for you"):
        client.exec("denied", ["true"])


def test_app_exceptions(vzd: Vzd) -> None:
    # After an answer (FastAPI answers 500 and raises on): kept, as a server would log it.
    with ASGITransport(vzd.app) as t:
        assert t.request("GET", "/boom").status == 500
        assert [str(e) for e in t.app_errors] == ["a bug"]

    # Before any answer: raised in the caller, or (asked not to) a 500.
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("no answer")

    with ASGITransport(broken) as t, pytest.raises(RuntimeError, match="no answer"):
        t.request("GET", "/")
    with ASGITransport(broken, raise_app_exceptions=False) as t:
        assert t.request("GET", "/").status == 500


def test_lifespan_runs_at_open_and_close() -> None:
    calls: list[str] = []

    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        calls.append("startup")
        yield {"ready": True}
        calls.append("shutdown")

    from contextlib import asynccontextmanager

    app = FastAPI(lifespan=asynccontextmanager(lifespan))

    @app.get("/ready")
    async def ready(request: Request) -> bool:
        return bool(request.state.ready)

    with ASGITransport(app, lifespan=True) as t:
        assert calls == ["startup"]
        assert json.loads(t.request("GET", "/ready").read()) is True
    assert calls == ["startup", "shutdown"]
