"""The QEMU engine's disk capabilities: snapshots as frozen qcow2 layers, their clean-up,
and a disk flattened into an image. The chain itself is managed in ``disks``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vzkit.api.instances import Instance
from vzkit.engines.base import Captured, EngineState, Frozen
from vzkit.engines.qemu import disks, fsfreeze
from vzkit.engines.qemu.disks import QemuState
from vzkit.errors import InvalidConfig
from vzkit.host import perms, safefs
from vzkit.storage import qcow2

if TYPE_CHECKING:
    from vzkit.engines.qemu.engine import QemuEngine


class QemuDisks:
    """Disk snapshots, disk layers and publishing, for ``vm`` and ``microvm`` alike."""

    def __init__(self, engine: QemuEngine) -> None:
        self.engine = engine

    async def freeze(
        self, inst: Instance, uuid: str, state: EngineState, dest: Path | None = None
    ) -> Frozen | None:
        """Freeze the disk's top as a layer (a running VM must be paused), with the
        guest's file systems frozen around it (``fsfreeze``; a warning about a snapshot
        built in ``dest`` is left there)."""
        st = QemuState.of(state)
        sdir = self.engine.state_dir(uuid)
        if not safefs.exists(sdir, st.disk):
            return None  # a micro-VM booted from its initramfs has no disk
        qmp = self.engine.running_qmp(inst.name)
        if qmp is not None:
            memory = self.engine.memory_snapshot_started(inst.name)
            agent = functools.partial(self.engine.agent, inst.name)
            async with fsfreeze.quiesced(qmp, agent, inst, dest, memory=memory):
                new = await disks.freeze_live(qmp, sdir, st.disk, self.engine.user)
        else:
            new = await disks.freeze_offline(sdir, st.disk)
        return Frozen(live=QemuState(top=new), fixed=st, layer=st.disk)

    async def capture(self, inst: Instance, uuid: str, state: EngineState, dest: Path) -> Captured:
        """A snapshot's disk is the frozen top; nothing is copied into ``dest``."""
        frozen = await self.freeze(inst, uuid, state, dest)
        if frozen is None:
            return Captured(state)
        return Captured(frozen.live, frozen.layer)

    async def restore(
        self, inst: Instance, uuid: str, state: EngineState, snapshot: Path, layer: str | None
    ) -> EngineState:
        if layer is None:
            return state
        return QemuState(top=await disks.new_top_over(self.engine.state_dir(uuid), layer))

    async def clone(
        self, src_uuid: str, src_state: EngineState, layer: str | None, dst_uuid: str
    ) -> EngineState:
        """A new instance directory whose disk is a fresh top over ``layer`` (frozen)."""
        dst = perms.vm_dir(self.engine.state_dir(dst_uuid), perms.qemu_gid(self.engine.settings))
        if layer is None:
            return QemuState()
        src = self.engine.state_dir(src_uuid)
        names = await asyncio.to_thread(disks.chain, src, layer)
        await asyncio.to_thread(disks.link_chain, src, dst, names)
        return QemuState(top=await disks.freeze_offline(dst, layer))

    async def prune(self, inst: Instance, uuid: str, state: EngineState, keep: list[str]) -> None:
        sdir = self.engine.state_dir(uuid)
        await asyncio.to_thread(disks.prune, sdir, [QemuState.of(state).disk, *keep])

    async def drop(self, inst: Instance, uuid: str, state: EngineState, layer: str) -> None:
        """Make a deleted snapshot's layer unneeded by merging it into its children."""
        running = QemuState.of(state).disk if self.engine.is_running(inst.name) else None
        await asyncio.to_thread(disks.merge_out, self.engine.state_dir(uuid), layer, running)

    def disk(self, inst: Instance, uuid: str, state: EngineState) -> Path:
        path = self.engine.state_dir(uuid) / QemuState.of(state).disk
        if not safefs.exists(path.parent, path.name):
            raise InvalidConfig(
                f"{inst.name!r} has no disk of its own: it boots image {inst.image!r} as is",
                hint="publish a VM with a root disk (such as one of the debian image)",
            )
        return path

    async def flatten(self, disk: Path, dest: Path, progress: Callable[[float], None]) -> None:
        await asyncio.to_thread(qcow2.convert, disk, dest, progress=progress)
