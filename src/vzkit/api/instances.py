"""Instance, image and exec models shared by the daemon (request/response bodies, OpenAPI),
the SDK and the CLI."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictBool, StrictInt, field_validator, model_validator

from vzkit.api.base import Strict
from vzkit.api.bounds import (
    DEFAULT_PROCESSES,
    MAX_SIZE,
    NAME_PATTERN,
    NAME_RE,
    NAME_RULE,
    PROCESSES,
    parse_size,
)
from vzkit.api.networks import FirewallRule, NicConfig, PortForward
from vzkit.api.storage import VolumeAttachment


def _memory(value: Any) -> Any:
    # A bare number means MiB, as with QEMU's -m; strings carry their unit.
    if isinstance(value, str):
        return parse_size(value, default_unit="mib")
    if isinstance(value, int) and value < 1024**2:
        return value * 1024**2
    return value


# The Field before the validator: the other way round pydantic writes "gt"/"le" into the
# JSON schema instead of "exclusiveMinimum"/"maximum", which no schema reader knows.
MemoryBytes = Annotated[int, Field(gt=0, le=MAX_SIZE), BeforeValidator(_memory)]
# A host CPU number (as in /sys/devices/system/cpu/cpuN); whether the host has it is
# checked when the instance starts.
CpuNumber = Annotated[int, Field(ge=0)]
Processes = Annotated[
    StrictInt,
    Field(
        ge=PROCESSES[0],
        le=PROCESSES[1],
        description="Processes and threads a container may have at once (its cgroup's "
        "pids limit; a fork bomb stops there). VMs: not applied, a guest's processes are "
        "its own kernel's",
    ),
]


def validate_name(name: str, what: str = "instance") -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"invalid {what} name {name!r}: {NAME_RULE}")
    return name


class InstanceType(StrEnum):
    MICROVM = "microvm"
    VM = "vm"
    CONTAINER = "container"


class InstanceState(StrEnum):
    """Lifecycle states (libvirt-like). Transitions live in vzkit.server.lifecycle."""

    CREATING = "creating"
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    CRASHED = "crashed"
    ERROR = "error"


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class Limits(Strict):
    cpus: int = Field(1, ge=1, le=256, description="Number of vCPUs")
    memory: MemoryBytes = Field(256 * 1024**2, description="Guest RAM in bytes (or '512MiB')")
    cpu_weight: int = Field(
        100, ge=1, le=10000, description="Relative CPU weight against other instances"
    )
    cpu_pin: list[CpuNumber] | None = Field(
        None, description="Host CPUs the instance may run on (default: any)"
    )
    processes: Processes = DEFAULT_PROCESSES


class LimitsUpdate(Strict):
    """A partial Limits: only the fields given change."""

    cpus: int | None = Field(None, ge=1, le=256)
    memory: MemoryBytes | None = None
    cpu_weight: int | None = Field(None, ge=1, le=10000)
    cpu_pin: list[CpuNumber] | None = None
    processes: Processes | None = None


class Security(Strict):
    """How an instance is isolated beyond its type's defaults."""

    privileged: StrictBool = Field(
        False,
        description="Containers only: run without a user namespace, as host root (its root "
        "is the host's, and files it writes are owned by host root). The default maps the "
        "container's root to an unprivileged host id",
    )


PRIVILEGED_WARNING = (
    "privileged container: its root is host root (no user namespace), so a process that "
    "escapes its other namespaces owns the host"
)


class InstanceUpdate(Strict):
    """Request body of PATCH /1.0/instances/{name}."""

    limits: LimitsUpdate


class InstanceCreate(Strict):
    """Request body for creating (and optionally starting) an instance."""

    name: str | None = Field(
        None,
        description="Instance name; generated when absent",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    type: InstanceType = InstanceType.MICROVM
    image: str = "minimal"
    limits: Limits = Field(default_factory=Limits)
    start: bool = True
    ephemeral: bool = Field(False, description="Delete the instance when it stops")
    accel: Accel | None = Field(None, description="Force an accelerator instead of probing")
    nics: list[NicConfig] | None = Field(
        None,
        description="Network interfaces (eth0, eth1, ...); default: one on the daemon's "
        "default network (vzbr0); [] for none",
    )
    ports: list[PortForward] = Field(
        default_factory=list, description="Host ports to forward to the instance"
    )
    volumes: list[VolumeAttachment] = Field(
        default_factory=list, description="Volumes: disks for VMs, bind mounts for containers"
    )
    source: str | None = Field(
        None,
        description="INSTANCE/SNAPSHOT: start from that stateful snapshot's memory instead of "
        "booting (warm start); type, image and limits are the snapshot's",
    )
    security: Security = Field(default_factory=Security)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else validate_name(v)


class Instance(Strict):
    name: str
    type: InstanceType
    image: str
    image_digest: str = ""
    limits: Limits
    state: InstanceState
    ephemeral: bool = False
    accel: Accel | None = None
    pid: int | None = None
    reason: str | None = Field(None, description="Why the instance is crashed/error/stopped")
    created_at: datetime
    started_at: datetime | None = None
    agent_version: str | None = None
    kernel_release: str | None = None
    nics: list[NicConfig] = Field(
        default_factory=list, description="Interfaces, with address, MAC and name resolved"
    )
    ports: list[PortForward] = Field(default_factory=list, description="Host port forwards")
    volumes: list[VolumeAttachment] = Field(default_factory=list, description="Attached volumes")
    firewall: list[FirewallRule] | None = Field(
        None,
        description="Ingress allow-list: None lets everything in; a list (even empty) drops "
        "what it does not allow",
    )
    security: Security = Field(default_factory=Security)
    warnings: list[str] = Field(
        default_factory=list,
        description="What the user should know about this instance's configuration (read "
        "only: derived from it by the daemon)",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_privileged(cls, data: Any) -> Any:
        # A container recorded before user namespaces existed (a database row, an export
        # archive) ran as host root: it keeps that mode, since its files are host root's.
        if isinstance(data, dict) and data.get("type") == "container" and "security" not in data:
            data = {**data, "security": {"privileged": True}}
        return data

    @model_validator(mode="after")
    def _warnings(self) -> Instance:
        privileged = self.type is InstanceType.CONTAINER and self.security.privileged
        self.warnings = [PRIVILEGED_WARNING] if privileged else []
        return self


class StateAction(StrEnum):
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    PAUSE = "pause"
    RESUME = "resume"


class StateChange(Strict):
    action: StateAction
    force: bool = Field(False, description="Kill instead of a graceful stop")
    timeout: float = Field(30.0, gt=0, le=3600, description="Seconds to wait for a clean stop")


class ExecRequest(Strict):
    """First message on the exec WebSocket."""

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    tty: bool = False
    rows: int = Field(24, ge=1, le=10000)
    cols: int = Field(80, ge=1, le=10000)
    stdin: bool = Field(True, description="Whether the client sends stdin (else /dev/null)")
    timeout: float | None = Field(None, gt=0, description="Kill the command after this many s")


class ExecResult(Strict):
    exit_code: int
    signal: int | None = None
    timed_out: bool = False
    error: str | None = None


class ImageInfo(Strict):
    name: str
    digest: str
    kind: str = Field(description="'initramfs' (minimal) or 'disk' (root disk image)")
    kernel_release: str
    size: int
    created_at: datetime
    files: dict[str, str] = Field(default_factory=dict, description="role -> path")


class ErrorBody(Strict):
    error: str
    code: str
    hint: str | None = None
    details: dict[str, Any] | None = None


class InstanceStats(Strict):
    """A running instance's usage counters (GET /1.0/stats, and /metrics)."""

    name: str
    type: str
    state: str
    cpu_seconds: float | None = Field(None, description="CPU time used, all threads")
    memory_bytes: int | None = Field(None, description="Memory charged to its cgroup")
    pids: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = Field(None, description="Received by the instance, all NICs")
    net_tx_bytes: int | None = None
