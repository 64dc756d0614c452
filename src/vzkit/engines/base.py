"""The engine contract: a lifecycle core every engine implements, plus capabilities it declares.

An engine (QEMU for ``vm``/``microvm``, the container engine for ``container``) runs
instances; it never touches the database. What it knows about one instance beyond the
instance record (its disk's top layer, its container's lower directory...) is its own
:class:`EngineState` subclass, stored as JSON beside the record and read by nothing else.

Beyond the :class:`Engine` core, an engine declares per instance type what else it can do
(:class:`Capabilities`): each capability is an object implementing a small protocol, or
``None``; for a missing one the engine says in ``refusals`` what a request for it is told.
Services ask for a capability (through ``vzkit.server.lifecycle``, which also says in which
states each operation may run) and never branch on the instance type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

from pydantic import BaseModel, ConfigDict

from vzkit.api.instances import (
    Accel,
    ExecRequest,
    ExecResult,
    ImageInfo,
    Instance,
    InstanceType,
    Limits,
)
from vzkit.errors import VzError
from vzkit.network.nics import NetPlan, NicPlan
from vzkit.storage.manager import VolumeMount


class EngineState(BaseModel):
    """An engine's own facts about one instance; each engine subclasses it.

    Stored as JSON in the database (unknown keys of older rows are ignored), immutable:
    an engine operation that changes them returns a new one for the caller to store.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def of(cls, state: EngineState) -> Self:
        """``state`` as this engine's own model (it always is: the engine loaded it)."""
        if not isinstance(state, cls):
            raise TypeError(f"{cls.__name__} expected, got {type(state).__name__}")
        return state

    def dump(self) -> str:
        return self.model_dump_json(exclude_none=True)


@dataclass
class ExitInfo:
    """How an instance's process ended, as the engine observed it."""

    pid: int
    clean: bool
    reason: str


ExitCallback = Callable[[str, ExitInfo], Awaitable[None]]


@dataclass
class Started:
    pid: int
    agent_version: str | None = None
    kernel_release: str | None = None
    accel: Accel | None = None  # the accelerator it runs on (None: it shares the host kernel)


class ExecSession(Protocol):
    async def write_stdin(self, data: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def signal(self, signum: int) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def read(self) -> tuple[int, bytes] | None: ...
    async def wait(self) -> ExecResult: ...


class ConsoleStream(Protocol):
    async def read(self, n: int) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...


# -- capabilities ------------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """What a snapshot captured: the instance's state from now on, the frozen disk layer
    the snapshot names (if any), and the bytes copied into the snapshot."""

    state: EngineState
    layer: str | None = None
    size: int = 0


@dataclass(frozen=True)
class Frozen:
    """A disk switched to a new empty top: ``live`` is the instance's state from now on,
    ``fixed`` the same state whose top is the frozen ``layer``, which never changes again."""

    live: EngineState
    fixed: EngineState
    layer: str


class DiskSnapshots(Protocol):
    """The instance's persistent files (disk, container files) captured, put back, cloned.
    A running instance is paused by the caller around ``capture``."""

    async def capture(
        self, inst: Instance, uuid: str, state: EngineState, dest: Path
    ) -> Captured: ...

    async def restore(
        self, inst: Instance, uuid: str, state: EngineState, snapshot: Path, layer: str | None
    ) -> EngineState:
        """Put a stopped instance's files back to the snapshot in ``snapshot``."""
        ...

    async def clone(
        self, src_uuid: str, src_state: EngineState, layer: str | None, dst_uuid: str
    ) -> EngineState:
        """A new instance with a copy of ``src``'s files: with ``layer`` (a frozen disk
        layer), a copy-on-write disk over it; else a copy of its current files."""
        ...


class DiskLayers(Protocol):
    """Disks kept as chains of layers: a frozen layer is shared, so it is merged or
    removed with care."""

    async def freeze(self, inst: Instance, uuid: str, state: EngineState) -> Frozen | None:
        """Freeze the disk's top (a running instance must be paused); None: no disk."""
        ...

    async def prune(self, inst: Instance, uuid: str, state: EngineState, keep: list[str]) -> None:
        """Remove layers neither the current disk nor the ``keep`` layers need."""
        ...

    async def drop(self, inst: Instance, uuid: str, state: EngineState, layer: str) -> None:
        """Merge a deleted snapshot's layer into what depends on it (StateError if unsafe)."""
        ...


class MemorySnapshots(Protocol):
    """Saving a running instance's memory and device state, and starting from it."""

    async def quiesce(self, name: str) -> None:
        """Make the memory cheap to save (drop caches, zero free pages)."""
        ...

    async def save_state(self, name: str, dest: Path) -> int:
        """Write a paused instance's memory and device state to ``dest``; returns its size."""
        ...

    async def start_from(
        self,
        inst: Instance,
        uuid: str,
        state: EngineState,
        net: NetPlan,
        memory: Path,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        """Start by loading saved memory state instead of booting."""
        ...


class LiveVolumes(Protocol):
    """Volumes given to and taken from a running instance."""

    async def attach_volume(self, name: str, volume: VolumeMount) -> None: ...
    async def detach_volume(self, name: str, volume: VolumeMount) -> None: ...


class VolumeResize(Protocol):
    async def resize_volume(self, name: str, volume: VolumeMount, size: int) -> None:
        """Tell a running instance its attached block volume grew."""
        ...


class NicHotplug(Protocol):
    """Network interfaces added to and removed from a running instance."""

    async def plug(self, name: str, nic: NicPlan) -> None: ...
    async def unplug(self, name: str, nic: NicPlan) -> None: ...


class LiveMigration(Protocol):
    """Moving a running instance to another host (declared for what comes; no engine has it)."""

    async def migrate_out(self, name: str, dest: str) -> None: ...
    async def migrate_in(self, inst: Instance, uuid: str, state: EngineState) -> Started: ...


class Export(Protocol):
    """The instance's files in an export archive, and an archive's files adopted."""

    def stage(
        self, inst: Instance, uuid: str, state: EngineState, layers: list[str], dest: Path
    ) -> dict[str, str]:
        """Hard-link what travels (disks, files, the snapshots' directory) under ``dest``
        (blocking: run it in a thread); returns the header's engine facts."""
        ...

    def check_archive(self, files: Path, header: Mapping[str, object]) -> None:
        """Refuse an unpacked archive's files that could reach outside it (blocking)."""
        ...

    async def adopt(
        self,
        files: Path,
        header: Mapping[str, object],
        record: Instance,
        local: ImageInfo,
        archived: ImageInfo,
    ) -> EngineState:
        """Make the checked files in ``files`` an instance's own; returns its state."""
        ...


class Publish(DiskLayers, Protocol):
    """A disk turned into a standalone image."""

    def disk(self, inst: Instance, uuid: str, state: EngineState) -> Path:
        """The disk of ``state`` (InvalidConfig when the instance has none)."""
        ...

    async def flatten(self, disk: Path, dest: Path, progress: Callable[[float], None]) -> None:
        """Write ``disk`` with its whole chain into ``dest`` as one file."""
        ...


@dataclass(frozen=True)
class Refusal:
    """What a request for a missing capability is told. ``message`` and ``hint`` are
    templates of ``{name}`` (the instance's name)."""

    kind: type[VzError]
    message: str
    hint: str

    def error(self, name: str) -> VzError:
        return self.kind(self.message.format(name=name), hint=self.hint.format(name=name))


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do for one instance type beyond the core (None: it cannot).

    ``refusals`` maps an operation (a ``vzkit.server.lifecycle`` rule name) to what its
    request is told when the capability it needs is missing.
    """

    snapshots: DiskSnapshots
    export: Export
    disk_layers: DiskLayers | None = None
    memory_snapshots: MemorySnapshots | None = None
    live_volumes: LiveVolumes | None = None
    volume_resize: VolumeResize | None = None
    nic_hotplug: NicHotplug | None = None
    live_migration: LiveMigration | None = None
    live_export: Export | None = None  # exported while it runs (a frozen disk layer)
    publish: Publish | None = None
    tap_nics: bool = False  # NICs are TAP devices (VMs), else veth pairs (containers)
    block_volumes: bool = False  # volumes are disks in the guest, not mounts at a path
    refusals: Mapping[str, Refusal] = field(default_factory=dict)


# -- the core ----------------------------------------------------------------------------


class Engine(Protocol):
    """An engine runs instances; it never touches the database (the services do)."""

    def capabilities(self, kind: InstanceType) -> Capabilities: ...

    def load_state(self, data: str) -> EngineState:
        """The engine's state of an instance from its stored JSON."""
        ...

    def set_exit_callback(self, cb: ExitCallback) -> None: ...

    async def create(self, inst: Instance, uuid: str) -> EngineState:
        """Make the instance's persistent files (disks); returns its state to store."""
        ...

    async def start(
        self,
        inst: Instance,
        uuid: str,
        state: EngineState,
        net: NetPlan,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        """Boot the instance with its NICs plugged in and configured (addresses, routes,
        resolv.conf) before it counts as running."""
        ...

    async def attach(self, inst: Instance, uuid: str, state: EngineState) -> str | None:
        """Re-attach to a live instance after a daemon restart.

        Returns its observed state ("running" or "paused"), or None when it is gone.
        """
        ...

    async def stop(self, name: str, *, force: bool, timeout: float) -> None: ...
    async def update(self, inst: Instance, limits: Limits) -> None:
        """Apply new limits to a running instance (StateError if that needs a restart)."""
        ...

    async def pause(self, name: str) -> None: ...
    async def resume(self, name: str) -> None: ...
    async def exec(self, name: str, req: ExecRequest) -> ExecSession: ...
    async def push_file(
        self, name: str, path: str, data: AsyncIterator[bytes], mode: int, parents: bool
    ) -> None: ...
    async def pull_file(self, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]: ...
    async def open_console(self, name: str) -> ConsoleStream: ...
    def console_log(self, name: str, uuid: str) -> bytes: ...
    def state_dir(self, uuid: str) -> Path: ...
    async def io_stats(self, name: str) -> tuple[int, int] | None:
        """Disk bytes read and written by a running instance, if the engine knows them."""
        ...

    async def destroy(self, inst: Instance, uuid: str) -> None:
        """Remove everything the instance owns on the host (it must be stopped)."""
        ...

    async def close(self) -> None:
        """Drop connections to running instances; they keep running."""
        ...
