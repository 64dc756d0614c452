"""Snapshot and copy models (the on-disk store is vzkit.storage.snapshots)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, StrictBool, field_validator

from vzkit.api.base import Strict
from vzkit.api.bounds import NAME_PATTERN, NAME_RE, NAME_RULE

__all__ = ["CopyRequest", "SnapshotCreate", "SnapshotInfo"]


class SnapshotInfo(Strict):
    name: str
    instance: str
    created_at: datetime
    stateful: bool = Field(False, description="Holds the running memory and device state")
    layer: str | None = Field(None, description="The frozen disk layer (VMs with a disk)")
    size: int = Field(0, description="Bytes of memory state and copied files")
    config: dict[str, Any] = Field(
        default_factory=dict, description="The instance's limits and NICs when it was taken"
    )


class SnapshotCreate(Strict):
    """Request body of POST /1.0/instances/{name}/snapshots."""

    name: str | None = Field(
        None, description="Default: snap0, snap1, ...", json_schema_extra={"pattern": NAME_PATTERN}
    )
    stateful: StrictBool = Field(False, description="Also save the running memory and device state")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError(f"invalid snapshot name {value!r}: {NAME_RULE}")
        return value


class CopyRequest(Strict):
    """Request body of POST /1.0/instances/{name}/copy."""

    name: str = Field(json_schema_extra={"pattern": NAME_PATTERN})

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"invalid instance name {value!r}: {NAME_RULE}")
        return value
