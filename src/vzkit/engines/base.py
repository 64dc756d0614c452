"""What every engine (QEMU for vm/microvm, the container runtime) offers the actions layer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vzkit.models import ExecRequest, ExecResult, Instance, Limits
from vzkit.network.nics import NetPlan, NicPlan


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
        self, inst: Instance, uuid: str, runtime: dict[str, Any], net: NetPlan
    ) -> Started:
        """Boot the instance with its NICs plugged in and configured (addresses, routes,
        resolv.conf) before it counts as running."""
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
