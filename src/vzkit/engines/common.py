"""What the process-based engines share: exit watching, the console log, the exit report.

QEMU processes and container inits are not the daemon's children (they must outlive it),
so their exits are watched through pidfds, which work for any process and fire at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from vzkit.engines.base import ExitCallback, ExitInfo
from vzkit.settings import Settings

CONSOLE_LOG_MAX = 1024 * 1024


class ProcessEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._exit_cb: ExitCallback | None = None
        self._pidfds: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def set_exit_callback(self, cb: ExitCallback) -> None:
        self._exit_cb = cb

    def state_dir(self, uuid: str) -> Path:
        return self.settings.instances_dir / uuid

    def console_log(self, name: str, uuid: str) -> bytes:
        try:
            return (self.state_dir(uuid) / "console.log").read_bytes()[-CONSOLE_LOG_MAX:]
        except FileNotFoundError:
            return b""

    def watch_exit(self, pid: int, handler: Callable[[], Awaitable[None]]) -> None:
        """Run ``handler`` once ``pid`` has exited."""
        fd = os.pidfd_open(pid)
        self._pidfds[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, pid, handler)

    def unwatch_exit(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _exited(self, pid: int, handler: Callable[[], Awaitable[None]]) -> None:
        self.unwatch_exit(pid)

        async def run() -> None:
            await handler()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def report_exit(self, name: str, info: ExitInfo) -> None:
        if self._exit_cb is not None:
            await self._exit_cb(name, info)
