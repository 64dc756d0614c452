"""Instance, image and exec models shared by the daemon (request/response bodies, OpenAPI),
the SDK and the CLI."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from vzkit.api.base import Strict
from vzkit.api.bounds import (
    CPU_WEIGHT,
    DEFAULT_PROCESSES,
    MAX_CPUS,
    MAX_MEMORY,
    MAX_STOP_TIMEOUT,
    MIN_MEMORY,
    NAME_PATTERN,
    NAME_RE,
    NAME_RULE,
    PROCESSES,
    MiB,
    check_memory,
    format_size,
    parse_size,
)
from vzkit.api.networks import FirewallRule, NicConfig, PortForward
from vzkit.api.storage import VolumeAttachment


def _memory(value: Any) -> Any:
    # JSON's types matter: true is not 1 MiB and 2.5 is not a size. A bare number below
    # 1 MiB means MiB, as with QEMU's -m; strings carry their unit.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("memory is a whole number of bytes, or a string such as '512MiB'")
    size = parse_size(value, default_unit="mib", maximum=MAX_MEMORY)
    if isinstance(value, int) and size < MiB:
        size *= MiB
    return size


_MEMORY_RULE = (
    "Guest RAM in bytes, or a string such as '512MiB' (a bare number below 1 MiB counts "
    "MiB); at least "
    + ", ".join(f"{format_size(n)} for a {t}" for t, n in MIN_MEMORY.items())
    + f"; at most {format_size(MAX_MEMORY)}"
)
# The Field before the validator: the other way round pydantic writes "gt"/"le" into the
# JSON schema instead of "exclusiveMinimum"/"maximum", which no schema reader knows.
MemoryBytes = Annotated[int, Field(gt=0, le=MAX_MEMORY), BeforeValidator(_memory)]
# A host CPU number (as in /sys/devices/system/cpu/cpuN); whether the host has it is
# checked when the instance starts.
CpuNumber = Annotated[StrictInt, Field(ge=0)]
Cpus = Annotated[StrictInt, Field(ge=1, le=MAX_CPUS, description="Number of vCPUs")]
CpuWeight = Annotated[
    StrictInt,
    Field(
        ge=CPU_WEIGHT[0],
        le=CPU_WEIGHT[1],
        description="Relative CPU weight against other instances",
    ),
]
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
    cpus: Cpus = 1
    memory: MemoryBytes = Field(256 * MiB, description=_MEMORY_RULE)
    cpu_weight: CpuWeight = 100
    cpu_pin: list[CpuNumber] | None = Field(
        None, description="Host CPUs the instance may run on (default: any)"
    )
    processes: Processes = DEFAULT_PROCESSES


class LimitsUpdate(Strict):
    """A partial Limits: only the fields given change."""

    cpus: Cpus | None = None
    memory: MemoryBytes | None = Field(None, description=_MEMORY_RULE)
    cpu_weight: CpuWeight | None = None
    cpu_pin: list[CpuNumber] | None = None
    processes: Processes | None = None

    @field_validator("memory")
    @classmethod
    def _memory_floor(cls, value: int | None) -> int | None:
        # The type's own floor is the service's to check: this body does not name it.
        return None if value is None else check_memory(value)


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
    start: StrictBool = True
    ephemeral: StrictBool = Field(False, description="Delete the instance when it stops")
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

    @model_validator(mode="after")
    def _memory_fits_type(self) -> InstanceCreate:
        # Checked on requests only, not in Limits: instances stored before a floor was
        # raised must still load.
        check_memory(self.limits.memory, self.type.value)
        return self


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
    force: StrictBool = Field(False, description="Kill instead of a graceful stop")
    timeout: StrictFloat = Field(
        30.0, gt=0, le=MAX_STOP_TIMEOUT, description="Seconds to wait for a clean stop"
    )


class ExecRequest(Strict):
    """First message on the exec WebSocket."""

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    tty: StrictBool = False
    rows: StrictInt = Field(24, ge=1, le=10000)
    cols: StrictInt = Field(80, ge=1, le=10000)
    stdin: StrictBool = Field(True, description="Whether the client sends stdin (else /dev/null)")
    timeout: StrictFloat | None = Field(
        None, gt=0, description="Kill the command after this many s"
    )


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
