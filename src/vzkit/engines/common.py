"""What the process-based engines share: exit watching, the console log, the exit report,
and the export archive's plumbing (hard-linked staging, the disk check on import).

QEMU processes and container inits are not the daemon's children (they must outlive it),
so their exits are watched through pidfds, which work for any process and fire at once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from vzkit.engines.base import ExitCallback, ExitInfo
from vzkit.errors import InvalidConfig
from vzkit.settings import Settings
from vzkit.storage import qcow2

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


def link_tree(src: Path, dst: Path) -> None:
    """``cp -al``: a tree of hard links, ownership, modes and xattrs included."""
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True, capture_output=True)


def stage_snapshots(sdir: Path, dest: Path) -> None:
    """Hard-link the instance's snapshot directories into an export being staged."""
    if (sdir / "snapshots").is_dir():
        link_tree(sdir / "snapshots", dest / "snapshots")


def check_archive_disks(files: Path, header: Mapping[str, object]) -> None:
    """Every qcow2 of an unpacked archive is a qcow2 backed only by another file of the
    archive, and the disk top the header names is one of its files (blocking)."""
    for path in files.glob("*.qcow2"):
        if path.is_symlink() or not path.is_file():
            raise InvalidConfig(f"archive member {path.name} is not a regular file")
        try:
            info = qcow2.info(path)
        except Exception as exc:
            raise InvalidConfig(f"archive disk {path.name} is not a valid qcow2: {exc}") from exc
        if info.get("format") != "qcow2":
            raise InvalidConfig(f"archive disk {path.name} is not a qcow2 image")
        backing = info.get("backing-filename")
        if backing is not None and (
            "/" in backing or backing.startswith(".") or not (files / backing).is_file()
        ):
            raise InvalidConfig(
                f"archive disk {path.name} points outside the archive ({backing!r})",
                hint="refusing it: a crafted backing path could read any file on this host",
            )
    top = header.get("top")
    if top is not None and (not isinstance(top, str) or not (files / top).is_file()):
        raise InvalidConfig(f"the archive's disk {top!r} is missing")
