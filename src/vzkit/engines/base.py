"""What every engine (QEMU for vm/microvm, the container runtime) offers the actions layer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vzkit.api.instances import ExecRequest, ExecResult, Instance, Limits
from vzkit.network.nics import NetPlan, NicPlan
from vzkit.storage.manager import VolumeMount


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
    runtime: dict[str, Any] = field(default_factory=dict)
    agent_version: str | None = None
    kernel_release: str | None = None


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


class Engine(Protocol):
    """An engine runs instances; it never touches the database (the actions layer does)."""

    def set_exit_callback(self, cb: ExitCallback) -> None: ...

    async def create(self, inst: Instance, uuid: str) -> dict[str, Any]:
        """Make the instance's persistent files (disks); return runtime facts to store."""
        ...

    async def start(
        self,
        inst: Instance,
        uuid: str,
        runtime: dict[str, Any],
        net: NetPlan,
        restore: Path | None = None,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        """Boot the instance with its NICs plugged in and configured (addresses, routes,
        resolv.conf) before it counts as running; with ``restore``, load that saved memory
        state instead of booting (VMs)."""
        ...

    # Snapshots and copies. A running instance is paused by the caller around these.
    async def snapshot_disk(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], dest: Path
    ) -> tuple[dict[str, Any], str | None]:
        """Capture the instance's disk state for a snapshot being built in ``dest``;
        returns the new runtime facts and the name of a frozen disk layer, if any."""
        ...

    async def quiesce(self, name: str) -> None:
        """Prepare a running VM's memory for saving (drop caches, zero free pages)."""
        ...

    async def save_state(self, name: str, dest: Path) -> int:
        """Write a paused VM's memory and device state to ``dest``; returns its size."""
        ...

    async def restore_disk(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], snapshot: Path, layer: str | None
    ) -> dict[str, Any]:
        """Put a stopped instance's disk back to a snapshot's; returns the new runtime."""
        ...

    async def clone_disk(self, src_uuid: str, layer: str | None, dst_uuid: str) -> dict[str, Any]:
        """Give a new instance a copy-on-write copy of ``src``'s frozen disk state."""
        ...

    async def prune_disks(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], keep: list[str]
    ) -> None:
        """Remove disk layers neither the current disk nor the ``keep`` layers need."""
        ...

    async def drop_layer(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], layer: str
    ) -> None:
        """Merge a deleted snapshot's layer into what depends on it (StateError if unsafe)."""
        ...

    def state_dir(self, uuid: str) -> Path: ...

    async def io_stats(self, name: str) -> tuple[int, int] | None:
        """Disk bytes read and written by a running instance, if the engine knows them."""
        ...

    async def attach_volume(self, name: str, volume: VolumeMount) -> None:
        """Give a running instance a volume (StateError if the engine cannot live)."""
        ...

    async def detach_volume(self, name: str, volume: VolumeMount) -> None: ...
    async def resize_volume(self, name: str, volume: VolumeMount, size: int) -> None:
        """Tell a running instance its attached volume grew (QMP block_resize)."""
        ...

    async def plug(self, name: str, nic: NicPlan) -> None:
        """Add a NIC to a running instance (StateError if the engine cannot)."""
        ...

    async def unplug(self, name: str, nic: NicPlan) -> None:
        """Remove a NIC from a running instance (StateError if the engine cannot)."""
        ...

    async def attach(self, inst: Instance, uuid: str, runtime: dict[str, Any]) -> str | None:
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
    async def destroy(self, inst: Instance, uuid: str) -> None:
        """Remove everything the instance owns on the host (it must be stopped)."""
        ...

    async def close(self) -> None:
        """Drop connections to running instances; they keep running."""
        ...
