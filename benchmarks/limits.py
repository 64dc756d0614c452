"""What the request limits cost per request, against the same app without them.

`RequestLimits` wraps every HTTP request vzd serves (route lookup, Content-Length check,
a timed and counted receive). Measured in-process, so the number is the middleware's own
and not the noise of a loaded machine's HTTP round trip: a bare ASGI app called directly
against the same app behind the middleware, for a GET (most calls: no body is read) and a
POST with a 200-byte JSON body; interleaved rounds, medians of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from starlette.types import Message, Receive, Scope, Send

from vzkit.server.limits import RequestLimits
from vzkit.settings import Settings

BODY = b'{"name": "web", "subnet": "10.1.2.0/24"}' * 5


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while scope["method"] == "POST":
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body[:2]})


def _scope(method: str) -> Scope:
    headers = [(b"host", b"vzd"), (b"accept", b"*/*")]
    if method == "POST":
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ]
    return {
        "type": "http",
        "method": method,
        "path": "/1.0/networks",
        "headers": headers,
        "client": ("uid=0", 1),
    }


async def _round(handler: object, method: str, n: int) -> float:
    async def receive() -> Message:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Message) -> None:
        pass

    call = handler  # an ASGI callable
    start = time.perf_counter()
    for _ in range(n):
        await call(_scope(method), receive, send)  # type: ignore[operator]
    return (time.perf_counter() - start) / n


async def run(rounds: int, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=Path(tmp))
        limited = RequestLimits(app, settings, caller=lambda s: None)
        for method in ("GET", "POST"):
            bare, wrapped = [], []
            for _ in range(rounds):
                bare.append(await _round(app, method, n))
                wrapped.append(await _round(limited, method, n))
            b, w = statistics.median(bare), statistics.median(wrapped)
            print(
                f"{method}: bare ASGI app {b * 1e6:.1f} us/request, behind RequestLimits "
                f"{w * 1e6:.1f} us/request (+{(w - b) * 1e6:.1f} us, ratio {w / b:.2f}x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.requests))


if __name__ == "__main__":
    main()
