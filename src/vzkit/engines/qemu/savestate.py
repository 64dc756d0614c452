"""A running VM's memory and device state to a file and back (QEMU migration to a file).

QEMU 7.2 has no ``file:`` migration URI. ``exec:cat > FILE`` works but QEMU reports the
migration complete when it has written into the pipe, not when ``cat`` has written the
file, so a rename right then could publish a short file. Instead the file's descriptor is
handed to QEMU over the QMP socket (SCM_RIGHTS + ``getfd``) and migrated to with ``fd:``:
when QEMU says "completed" every byte has been written by QEMU itself. The file is written
under a temporary name and renamed only once complete (and fsynced), so a crash at any
point leaves either the whole state or no state under the final name.

Restoring starts a new QEMU with the same machine and ``-incoming fd:N`` (the file opened
read-only and inherited); the VM stays paused after loading (the source was paused when
saved) until the caller continues it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from vzkit.errors import EngineError, ResourceExhausted

_POLL = 0.005
# Migration's default bandwidth cap (32 MiB/s) exists for live migration over a network;
# to a local file it only makes a snapshot slow.
_BANDWIDTH = 64 * 1024**3


async def save(qmp: Any, dest: Path, *, timeout: float = 300.0) -> int:
    """Write the (paused) VM's state to ``dest``; returns its size in bytes.

    The VM is left paused (``postmigrate``); ``cont`` resumes it.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        qmp.send_fd_scm(fd)
        await qmp.execute("getfd", {"fdname": "vz-save"})
    finally:
        os.close(fd)  # QEMU holds its own copy now
    try:
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": _BANDWIDTH})
        await qmp.execute("migrate", {"uri": "fd:vz-save"})
        info = await _wait(qmp, timeout)
        if info.get("status") != "completed":
            why = str(info.get("error-desc") or info.get("status"))
            if "No space left" in why:
                raise ResourceExhausted(
                    f"saving the VM state failed: {why}", hint=f"free space under {dest.parent}"
                )
            raise EngineError(f"saving the VM state failed: {why}")
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(Exception):
            await qmp.execute("migrate_cancel")
        tmp.unlink(missing_ok=True)
        raise
    return dest.lstat().st_size


async def _wait(qmp: Any, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if loop.time() > deadline:
            raise EngineError(f"saving the VM state took more than {timeout:g} s")
        await asyncio.sleep(_POLL)


def incoming_args(fd: int) -> list[str]:
    """QEMU arguments that load the state from inherited descriptor ``fd``."""
    return ["-incoming", f"fd:{fd}"]


async def wait_loaded(qmp: Any, timeout: float = 120.0) -> None:
    """Wait until an ``-incoming`` QEMU has loaded its state (it is then paused)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status: dict[str, Any] = await qmp.execute("query-status")
        state = status.get("status")
        if state not in ("inmigrate", "prelaunch"):
            if state in ("paused", "running", "postmigrate"):
                return
            raise EngineError(f"loading the VM state failed: QEMU is {state}")
        if loop.time() > deadline:
            raise EngineError(f"loading the VM state took more than {timeout:g} s")
        await asyncio.sleep(_POLL)
