"""What the process-based engines share: exit watching, the console log, the exit report,
and the export archive's plumbing (hard-linked staging, the disk check on import).

QEMU processes and container inits are not the daemon's children (they must outlive it),
so their exits are watched through pidfds, which work for any process and fire at once.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import struct
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from vzkit.engines.base import ExitCallback, ExitInfo
from vzkit.errors import InvalidConfig
from vzkit.host import safefs
from vzkit.settings import Settings
from vzkit.storage import qcow2
from vzkit.storage.snapshots import SnapshotStore

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
            return safefs.read_tail(self.state_dir(uuid), "console.log", CONSOLE_LOG_MAX)
        except OSError:  # missing, or not a file of the instance's own
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
    """``cp -al``: a tree of hard links, ownership, modes and xattrs included. ``-a`` never
    dereferences (a link in the tree, or ``src`` itself, is linked as the link it is)."""
    subprocess.run(["cp", "-al", "--", str(src), str(dst)], check=True, capture_output=True)


def stage_snapshots(sdir: Path, dest: Path) -> None:
    """Hard-link the instance's snapshot directories into an export being staged."""
    if safefs.exists(sdir, "snapshots", stat.S_IFDIR):
        link_tree(sdir / "snapshots", dest / "snapshots")


# The names vzkit gives disk layers; anything else (a ":" would be read as a protocol by
# QEMU, a "/" as a path) is refused in an archive.
_DISK_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,100}\.qcow2\Z")
_QCOW2_MAGIC = b"QFI\xfb"
_EXTERNAL_DATA_FILE = 1 << 2  # qcow2 v3 incompatible feature bit


def _refuse(name: str, why: str) -> InvalidConfig:
    return InvalidConfig(
        f"archive disk {name} {why}",
        hint="refusing it: a disk of an archive may use only other disks of the archive",
    )


def _backing_name(files: Path, name: str) -> str | None:
    """The backing file named in a qcow2's own header, read without qemu-img (so nothing
    the header names is opened before it is checked); refuses an external data file."""
    fd = safefs.open_file(files, name)
    try:
        head = os.pread(fd, 104, 0)
        if len(head) < 72 or head[:4] != _QCOW2_MAGIC:
            raise _refuse(name, "is not a qcow2 image")
        version, offset, size = struct.unpack(">IQI", head[4:20])
        if version >= 3 and len(head) >= 80:
            (incompatible,) = struct.unpack(">Q", head[72:80])
            if incompatible & _EXTERNAL_DATA_FILE:
                raise _refuse(name, "keeps its data in an external file")
        if not offset:
            return None
        if size > 1023:
            raise _refuse(name, "has a backing file name too long")
        return os.pread(fd, size, offset).decode(errors="replace")
    finally:
        os.close(fd)


def archive_disks(files: Path) -> set[str]:
    """The qcow2 files at the top of an unpacked archive's files, checked (blocking): each a
    regular file of a vzkit layer name, a qcow2 whose whole backing chain (read by
    ``qemu-img info --backing-chain``) is qcow2 files of the same directory, none with an
    external data file."""
    names = {e.name for e in os.scandir(files) if e.name.endswith(".qcow2")}
    for name in sorted(names):
        if not _DISK_NAME.match(name) or not safefs.exists(files, name):
            raise _refuse(name, "is not a regular file with a disk layer's name")
        backing = _backing_name(files, name)
        if backing is not None and backing not in names:
            raise _refuse(name, f"points outside the archive ({backing!r})")
    # Every header is known to be clean: qemu-img may now open the chains.
    for name in sorted(names):
        try:
            chain = qcow2.info(files / name, chain=True)
        except Exception as exc:
            raise _refuse(name, f"is not a valid qcow2: {exc}") from exc
        for layer in chain:
            where = Path(str(layer.get("filename", "")))
            data = layer.get("format-specific", {}).get("data", {})
            if layer.get("format") != "qcow2" or where.parent != files or where.name not in names:
                raise _refuse(name, f"has {where.name!r} in its chain, not a qcow2 of the archive")
            if data.get("data-file") or data.get("data-file-raw"):
                raise _refuse(name, "keeps its data in an external file")
            if layer.get("backing-filename-format") not in (None, "qcow2"):
                raise _refuse(name, "names a backing file that is not a qcow2")
    return names


def check_archive_disks(
    files: Path, header: Mapping[str, object], layout: Callable[[str, int], bool]
) -> None:
    """An unpacked archive's files: each top entry one the engine expects (``layout`` of
    its name and ``stat`` type), the disks clean (:func:`archive_disks`), and the disk top
    the header names and every snapshot's layer among them (blocking)."""
    for entry in os.scandir(files):
        kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
        if not layout(entry.name, kind):
            raise InvalidConfig(
                f"unexpected file {entry.name!r} in the archive's instance files",
                hint="export the instance again with vz export",
            )
    names = archive_disks(files)
    top = header.get("top")
    if top is not None and top not in names:
        raise InvalidConfig(f"the archive's disk {top!r} is missing")
    for snap in SnapshotStore(files, "?").list():
        if snap.layer is not None and snap.layer not in names:
            raise InvalidConfig(f"the archive's snapshot {snap.name!r} has no disk layer")
