"""Storage resource models: pools and volumes, strict like every other resource model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, field_validator

from vzkit.api.base import Strict
from vzkit.api.bounds import (
    MAX_VOLUME_SIZE,
    MIN_VOLUME_SIZE,
    NAME_PATTERN,
    NAME_RE,
    NAME_RULE,
    parse_size,
)

__all__ = [
    "MAX_VOLUME_SIZE",
    "MIN_VOLUME_SIZE",
    "Content",
    "PoolConfig",
    "PoolInfo",
    "VolumeAttachment",
    "VolumeConfig",
    "VolumeInfo",
    "VolumeSize",
    "VolumeUpdate",
]

PATH_MAX = 4095  # bytes of a path the kernel takes (PATH_MAX less the final NUL)
SECTOR = 512

# block: a qcow2 file, attached to VMs as a disk; filesystem: a directory, bind-mounted
# into containers (or shared with VMs through virtiofs).
Content = Literal["block", "filesystem"]


def _size(value: Any) -> Any:
    # A bare number is bytes (unlike Limits.memory, whose bare numbers are MiB as with -m);
    # JSON's types matter: true or 1.5 is no size.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("size is a whole number of bytes, or a string such as '10GiB'")
    if isinstance(value, str):
        value = parse_size(value, maximum=MAX_VOLUME_SIZE)
    # qcow2 sizes are whole sectors: qemu-img rounds up on create and refuses others on
    # resize, so the model holds the size the disk really gets.
    return -(-value // SECTOR) * SECTOR


VolumeSize = Annotated[
    int,
    # The Field before the validator, or the schema says "ge"/"le" (see models.MemoryBytes).
    Field(
        ge=MIN_VOLUME_SIZE,
        le=MAX_VOLUME_SIZE,
        description="Size in bytes, or a string such as '10GiB'; rounded up to 512 bytes",
    ),
    BeforeValidator(_size),
]


def _name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"invalid {what} name {value!r}: {NAME_RULE}")
    return value


# The pattern shows the rule in the API schema; the validator checks it with a clearer error.
_NAME_SCHEMA = Field(json_schema_extra={"pattern": NAME_PATTERN})
PoolName = Annotated[str, AfterValidator(lambda v: _name(v, "pool")), _NAME_SCHEMA]
VolumeName = Annotated[str, AfterValidator(lambda v: _name(v, "volume")), _NAME_SCHEMA]


class PoolConfig(Strict):
    """A storage pool: where volumes live and which driver manages them."""

    name: PoolName
    # Only "dir" exists today; the field is there so "btrfs" or "lvm" can join without
    # changing the shape of stored configs or API bodies.
    driver: Literal["dir"] = "dir"
    path: Path | None = Field(
        None, description="Directory of a dir pool; default: <state_dir>/storage/<name>"
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        text = str(value)
        # A relative path would depend on the daemon's working directory; '..' would let
        # two spellings of one directory pass for two pools.
        if not value.is_absolute() or ".." in value.parts:
            raise ValueError(f"pool path {text!r} must be absolute, without '..'")
        try:
            raw: bytes | None = os.fsencode(value)
        except UnicodeEncodeError:  # a lone surrogate: no file name has it
            raw = None
        if raw is None or b"\0" in raw or len(raw) > PATH_MAX:
            raise ValueError(
                f"invalid pool path {text!r}: at most {PATH_MAX} bytes of UTF-8, without NUL"
            )
        return value


class PoolInfo(PoolConfig):
    """A pool as the API returns it: its config and the space of its file system."""

    total: int = Field(ge=0, description="Bytes of the file system under the pool")
    used: int = Field(ge=0, description="Bytes in use on that file system (by anything)")
    free: int = Field(ge=0, description="Bytes available to vzkit")


class VolumeConfig(Strict):
    """A volume: a disk (block) or a directory (filesystem) in a pool."""

    name: VolumeName
    pool: PoolName = "default"
    size: VolumeSize
    content: Content = Field(
        "block", description="block: a qcow2 disk for VMs; filesystem: a directory for containers"
    )


class VolumeInfo(VolumeConfig):
    """A volume as the API returns it."""

    path: str = Field(description="The qcow2 file or directory on the host")
    used: int = Field(ge=0, description="Bytes actually allocated on the host")
    attached_to: list[str] = Field(
        default_factory=list, description="Instances that have the volume as a device"
    )


class VolumeUpdate(Strict):
    """Request body of PATCH /1.0/storage/{pool}/volumes/{name}: volumes only grow."""

    size: VolumeSize


class VolumeAttachment(Strict):
    """A volume an instance has: a disk for a VM, a bind mount for a container."""

    volume: VolumeName
    pool: PoolName = "default"
    path: str | None = Field(
        None,
        description="Containers: where it is mounted (absolute path); VMs: unused",
        json_schema_extra={"pattern": "^/.", "maxLength": PATH_MAX},
    )
    readonly: StrictBool = False

    @field_validator("path")
    @classmethod
    def _mount_point(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.startswith("/")
            or value == "/"
            or ".." in value.split("/")
            or "\0" in value
            or len(value) > PATH_MAX
        ):
            raise ValueError(
                f"invalid mount path {value!r}: absolute, not /, without '..' or NUL, "
                f"at most {PATH_MAX} characters"
            )
        return value
