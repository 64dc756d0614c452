"""A background operation as the API shows it (the registry is vzkit.server.operations)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from vzkit.api.base import Strict

__all__ = ["Operation", "OperationStatus"]


class OperationStatus(StrEnum):
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"


class Operation(Strict):
    id: str
    kind: str = Field(description="What it does, e.g. instance-create, instance-state")
    resource: str | None = Field(None, description="The instance (or other resource) it is on")
    status: OperationStatus = OperationStatus.RUNNING
    created_at: datetime
    updated_at: datetime
    result: Any = Field(None, description="The same body the synchronous call answers with")
    error: dict[str, Any] | None = Field(None, description="An ErrorBody when it failed")
