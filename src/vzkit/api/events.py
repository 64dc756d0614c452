"""A lifecycle event as the API streams it (the bus is vzkit.server.events)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from vzkit.api.base import Strict

__all__ = ["Event"]


class Event(Strict):
    type: str = Field(description="e.g. instance-created, instance-state, snapshot-created")
    time: datetime
    instance: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
