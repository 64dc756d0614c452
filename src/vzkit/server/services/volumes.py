"""Pools and volumes as operations: records in vzkit.storage.manager, devices in engines.

A volume is attached to one instance at a time (read-only attachments may share it).
Attaching to a running instance is live where the engine can (q35 VMs: PCIe hot-plug;
containers: a bind mount into the running container); micro-VMs take it at the next start.
"""

from __future__ import annotations

import asyncio

from vzkit.api.instances import Instance
from vzkit.api.storage import PoolConfig, PoolInfo, VolumeAttachment, VolumeConfig, VolumeInfo
from vzkit.errors import Conflict, InvalidConfig, NotFound
from vzkit.server import lifecycle
from vzkit.server.events import EventBus
from vzkit.server.services.guard import Engines, InstanceGuard
from vzkit.storage.manager import StorageManager, VolumeMount


class VolumeService:
    def __init__(
        self, storage: StorageManager, guard: InstanceGuard, engines: Engines, events: EventBus
    ) -> None:
        self.storage = storage
        self.guard = guard
        self.engines = engines
        self.events = events
        self._lock = asyncio.Lock()

    # -- pools -----------------------------------------------------------------------------

    def pools(self) -> list[PoolInfo]:
        return [self.storage.pool_info(p.name) for p in self.storage.pools()]

    def pool(self, name: str) -> PoolInfo:
        return self.storage.pool_info(name)

    async def create_pool(self, config: PoolConfig) -> PoolInfo:
        async with self._lock:
            pool = await asyncio.to_thread(self.storage.create_pool, config)
        return self.storage.pool_info(pool.name)

    async def delete_pool(self, name: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self.storage.delete_pool, name)

    # -- volumes ---------------------------------------------------------------------------

    def all(self, pool: str | None = None) -> list[VolumeInfo]:
        if pool is not None:
            self.storage.pool(pool)
        return self.storage.volumes(pool)

    def get(self, pool: str, name: str) -> VolumeInfo:
        return self.storage.volume(name, pool)

    async def create(self, config: VolumeConfig) -> VolumeInfo:
        async with self._lock:
            return await asyncio.to_thread(self.storage.create_volume, config)

    async def delete(self, pool: str, name: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self.storage.delete_volume, name, pool)

    async def resize(self, pool: str, name: str, size: int) -> VolumeInfo:
        """Grow a volume; live for a running VM that has it (the guest sees the new size)."""
        async with self._lock:
            info = self.storage.volume(name, pool)
            if size < info.size:
                raise InvalidConfig(
                    f"volume {name!r} is {info.size} bytes; volumes only grow",
                    hint="give a size larger than the current one",
                )
            for user in info.attached_to:
                inst = self.guard.get(user)
                resize = self.engines.caps(inst.type).volume_resize
                if inst.state in lifecycle.ACTIVE and info.content == "block" and resize:
                    att = next(v for v in inst.volumes if (v.pool, v.volume) == (pool, name))
                    await resize.resize_volume(user, self.storage.mount(inst, att), size)
                    self.storage.record_size(name, pool, size)
                    return self.storage.volume(name, pool)
            return await asyncio.to_thread(self.storage.resize_volume, name, pool, size)

    # -- what other services need ----------------------------------------------------------

    def mounts(self, inst: Instance) -> list[VolumeMount]:
        """Where ``inst``'s volumes are on the host, for its engine's start."""
        return [self.storage.mount(inst, att) for att in inst.volumes]

    def check(self, inst: Instance, new: list[VolumeAttachment]) -> None:
        """Whether ``inst`` may have the volumes ``new`` (kind, and nobody else writing)."""
        users = {
            (a.pool, a.volume): (i.name, a.readonly)
            for i in self.guard.instances()
            if i.name != inst.name
            for a in i.volumes
        }
        seen = {(a.pool, a.volume) for a in inst.volumes}
        block = self.engines.caps(inst.type).block_volumes
        for att in new:
            self.storage.mount(inst, att)
            key = (att.pool, att.volume)
            if key in seen:
                raise Conflict(f"{inst.name!r} already has volume {att.volume!r}")
            seen.add(key)
            other = users.get(key)
            if other is not None and not (other[1] and att.readonly):
                raise Conflict(
                    f"volume {att.volume!r} is attached to {other[0]!r}",
                    hint="detach it there first (only read-only attachments can share)",
                )
            if block and att.path is not None:
                raise InvalidConfig(
                    "a VM's volume has no mount path: it is a disk",
                    hint="leave out --path; inside the guest it is "
                    f"/dev/disk/by-id/virtio-{att.volume[:20]}",
                )

    # -- an instance's volumes -------------------------------------------------------------

    async def attach(self, name: str, att: VolumeAttachment) -> Instance:
        async with self.guard.hold(name) as rec:
            inst = rec.instance
            self.check(inst, [att])
            caps = self.engines.caps(inst.type)
            live = lifecycle.live("volume-attach", name, inst.state, caps, caps.live_volumes)
            if live is not None:
                await live.attach_volume(name, self.storage.mount(inst, att))
            self.events.publish("volume-attached", name, volume=att.volume, pool=att.pool)
            return self.guard.save(inst, volumes=[*inst.volumes, att])

    async def detach(self, name: str, pool: str, volume: str) -> Instance:
        async with self.guard.hold(name) as rec:
            inst = rec.instance
            att = next((v for v in inst.volumes if (v.pool, v.volume) == (pool, volume)), None)
            if att is None:
                raise NotFound(
                    f"instance {name!r} has no volume {volume!r} (pool {pool!r})",
                    hint=f"see its volumes: vz info {name}",
                )
            caps = self.engines.caps(inst.type)
            live = lifecycle.live("volume-detach", name, inst.state, caps, caps.live_volumes)
            if live is not None:
                await live.detach_volume(name, self.storage.mount(inst, att))
            self.events.publish("volume-detached", name, volume=volume, pool=pool)
            return self.guard.save(inst, volumes=[v for v in inst.volumes if v is not att])
