"""Volumes given to and taken from a running QEMU: q35 VMs have spare ``pcie-root-port``s
(see ``cmdline.HOTPLUG_PORTS``); a micro-VM's virtio-mmio has no hot-plug, so the engine
does not declare this capability for it. A grown volume is announced to any running VM.

QEMU gets every volume as a descriptor vzd opened (an fd set: ``add-fd`` here, ``-add-fd``
at start), never by path: its jail holds no volume pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from vzkit.engines.qemu import guest
from vzkit.engines.qemu.cmdline import HOTPLUG_PORTS, hotplug_port
from vzkit.errors import EngineError, ResourceExhausted
from vzkit.storage.manager import VolumeMount

if TYPE_CHECKING:
    from vzkit.engines.qemu.engine import QemuEngine


class QemuVolumes:
    """The live-volume and volume-resize capabilities of the QEMU engine."""

    def __init__(self, engine: QemuEngine) -> None:
        self.engine = engine

    async def attach_volume(self, name: str, volume: VolumeMount) -> None:
        qmp = self.engine.qmp(name)
        node = volume.device_id
        try:
            fd = open_volume(volume)
            try:
                qmp.send_fd_scm(fd)
                added: Any = await qmp.execute("add-fd", {"opaque": node})
            finally:
                os.close(fd)
            await qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": node,
                    "read-only": volume.readonly,
                    "file": {"driver": "file", "filename": f"/dev/fdset/{added['fdset-id']}"},
                },
            )
        except Exception as exc:
            raise EngineError(f"QEMU cannot open volume {volume.name!r}: {exc}") from exc
        device = {
            "driver": "virtio-blk-pci",
            "id": node,
            "drive": node,
            "serial": volume.name[:20],
        }
        errors = []
        # The first free spare port; a taken one refuses the device.
        for port in range(HOTPLUG_PORTS + 16):
            try:
                await qmp.execute("device_add", {**device, "bus": hotplug_port(port)})
            except Exception as exc:
                errors.append(str(exc))
                if "not found" in str(exc):
                    break
                continue
            # Without udev (the minimal image) nothing loads the driver of a device that
            # was not there at boot; the script does, and waits for the disk to appear.
            agent = await self.engine.agent(name)
            try:
                await guest.configure(
                    agent,
                    guest.disk_links([volume.name[:20]]),
                    "disks",
                    "the guest did not see the hot-plugged disk (here a q35 VM takes one "
                    f"live-attached volume); stop {name}, attach it, start it again",
                )
            except BaseException:
                # The guest never saw it: take it out again, nothing half-attached stays.
                with contextlib.suppress(Exception):
                    await qmp.execute("device_del", {"id": node})
                with contextlib.suppress(Exception):
                    await asyncio.sleep(0.5)
                    await qmp.execute("blockdev-del", {"node-name": node})
                raise
            return
        with contextlib.suppress(Exception):
            await qmp.execute("blockdev-del", {"node-name": node})
        raise ResourceExhausted(
            f"no free hot-plug slot for volume {volume.name!r} in {name!r}: {errors[-1]}",
            hint="detach another volume, or stop the VM and attach it (it then gets its own)",
        )

    async def detach_volume(self, name: str, volume: VolumeMount) -> None:
        qmp = self.engine.qmp(name)
        node = volume.device_id
        try:
            await qmp.execute("device_del", {"id": node})
        except Exception as exc:
            raise EngineError(f"cannot unplug volume {volume.name!r}: {exc}") from exc
        # The guest releases the device (PCIe hot-plug has the guest acknowledge; Linux
        # waits 5 s for a cancel first), then QEMU removes it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            devices: Any = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
            if not any(d.get("name") == node for d in devices):
                break
            await asyncio.sleep(0.1)
        else:
            raise EngineError(
                f"the guest of {name!r} did not release volume {volume.name!r} within 30 s",
                hint="it may still be in use inside the guest: unmount it there, then retry",
            )
        for n in (node, f"{node}-file"):
            with contextlib.suppress(Exception):
                await qmp.execute("blockdev-del", {"node-name": n})
        with contextlib.suppress(Exception):
            fdsets: Any = await qmp.execute("query-fdsets")
            for fdset in fdsets:
                if any(f.get("opaque") == node for f in fdset.get("fds", [])):
                    await qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})

    async def resize_volume(self, name: str, volume: VolumeMount, size: int) -> None:
        qmp = self.engine.qmp(name)
        try:
            await qmp.execute("block_resize", {"node-name": volume.device_id, "size": size})
        except Exception as exc:
            raise EngineError(f"resizing volume {volume.name!r} failed: {exc}") from exc


def open_volume(volume: VolumeMount) -> int:
    """The descriptor QEMU opens ``volume`` through (read-only if it is attached so)."""
    mode = os.O_RDONLY if volume.readonly else os.O_RDWR
    return os.open(volume.host_path, mode | os.O_CLOEXEC)


@contextlib.contextmanager
def opened_volumes(volumes: Sequence[VolumeMount]) -> Iterator[dict[str, int]]:
    """Descriptors of ``volumes`` by device id, for QEMU to inherit at start; closed after
    (QEMU holds its own copies by then)."""
    fds: dict[str, int] = {}
    try:
        for volume in volumes:
            try:
                fds[volume.device_id] = open_volume(volume)
            except OSError as exc:
                raise EngineError(
                    f"cannot open volume {volume.name!r}: {exc.strerror}",
                    hint=f"check {volume.host_path} in pool {volume.pool!r}",
                ) from exc
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)
