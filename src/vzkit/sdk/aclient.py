"""The SDK for asyncio code: :class:`AsyncClient` offers every :class:`Client` call as a
coroutine.

vzd's API is served on a unix socket and the sync client is the reference; the async one
runs each call in a worker thread (the sync client keeps one connection per thread), so
an event loop is never blocked and both stay the same API.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from vzkit.sdk.client import Client

__all__ = ["AsyncClient"]


class AsyncClient:
    """``await client.list_instances()``, ``await client.create_instance({...})``, ... and
    ``async for event in client.events()``; see :class:`vzkit.sdk.client.Client` for each call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = Client(*args, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        attr = getattr(self.sync, name)
        if not callable(attr) or name.startswith("_"):
            raise AttributeError(name)

        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(attr, *args, **kwargs)

        return call

    async def events(self, types: Sequence[str] | None = None) -> AsyncIterator[Any]:
        """Lifecycle events as they happen (the sync iterator, read in a thread)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def pump() -> None:
            try:
                for event in self.sync.events(types):
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as exc:  # handed to the reader
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        thread = threading.Thread(target=pump, name="vz-events", daemon=True)
        thread.start()
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    async def close(self) -> None:
        self.sync.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
