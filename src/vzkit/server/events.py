"""Lifecycle events: what happened to which resource, fanned out to every subscriber.

The actions layer publishes (instance state changes, creations and deletions, snapshots,
networks, volumes); the API streams them to clients over a WebSocket (``vz monitor``).
A slow subscriber never slows the daemon: its queue is bounded and, when full, its oldest
events are dropped and it is told how many with a ``lost`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

from vzkit.api.events import Event

__all__ = ["EventBus"]

_QUEUE = 1000


class _Subscriber:
    def __init__(self, types: frozenset[str] | None) -> None:
        self.types = types
        self.queue: asyncio.Queue[Event] = asyncio.Queue(_QUEUE)
        self.lost = 0


class EventBus:
    def __init__(self) -> None:
        self._subs: set[_Subscriber] = set()

    def publish(self, type: str, instance: str | None = None, /, **data: Any) -> Event:
        event = Event(type=type, time=datetime.now(UTC), instance=instance, data=data)
        for sub in self._subs:
            if sub.types is not None and type not in sub.types:
                continue
            if sub.queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()
                sub.lost += 1
            sub.queue.put_nowait(event)
        return event

    async def subscribe(self, types: set[str] | None = None) -> AsyncGenerator[Event, None]:
        sub = _Subscriber(frozenset(types) if types else None)
        self._subs.add(sub)
        try:
            while True:
                event = await sub.queue.get()
                if sub.lost:
                    lost, sub.lost = sub.lost, 0
                    yield Event(type="lost", time=datetime.now(UTC), data={"count": lost})
                yield event
        finally:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)
