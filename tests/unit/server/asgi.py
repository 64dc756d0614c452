"""A minimal in-process HTTP client for an ASGI app: one call, one request, the whole answer.

Enough for route tests (no sockets, no threads); the SDK's in-memory transport can take its
place in the ``api`` fixture (tests/unit/server/routers/conftest.py) once it lands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from starlette.types import ASGIApp, Message


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class AsgiClient:
    app: ASGIApp
    # The unix socket's caller, as vzd's server tags it (SO_PEERCRED).
    client: tuple[str, int] = ("uid=0", 1)
    sent: list[Message] = field(default_factory=list)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        headers = [(b"host", b"vzd"), (b"content-length", str(len(data)).encode())]
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": urlencode(query or {}).encode(),
            "headers": headers,
            "client": self.client,
            "server": None,
        }
        chunks = [{"type": "http.request", "body": data, "more_body": False}]

        async def receive() -> Message:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        answer = Answer(0, {})

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                answer.body += message.get("body", b"")

        await self.app(scope, receive, send)
        return answer

    async def get(self, path: str, **query: Any) -> Answer:
        return await self.request("GET", path, query=query)

    async def post(self, path: str, body: Any = None, **query: Any) -> Answer:
        return await self.request("POST", path, body, query=query)

    async def put(self, path: str, body: Any = None, **query: Any) -> Answer:
        return await self.request("PUT", path, body, query=query)

    async def patch(self, path: str, body: Any = None, **query: Any) -> Answer:
        return await self.request("PATCH", path, body, query=query)

    async def delete(self, path: str, **query: Any) -> Answer:
        return await self.request("DELETE", path, query=query)
