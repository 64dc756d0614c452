"""Snapshots and copies of instances.

Each operation holds the instance's lock. A running instance is paused around the moment
its state is captured (disk layer frozen, memory saved, container files copied), so the
pieces of a snapshot agree with each other; the snapshot itself is published by one
rename (vzkit.storage.snapshots), so it exists whole or not at all.
"""

from __future__ import annotations

import builtins
import contextlib
import shutil
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from vzkit.api.instances import Instance, InstanceState, Limits, StateAction, StateChange
from vzkit.api.networks import NicConfig
from vzkit.api.snapshots import SnapshotInfo
from vzkit.engines.base import DiskLayers, Frozen
from vzkit.errors import Conflict, InvalidConfig, NotFound
from vzkit.server import lifecycle
from vzkit.server.events import EventBus
from vzkit.server.services.guard import Engines, InstanceGuard, InstanceRecord
from vzkit.server.services.networks import NetworkService
from vzkit.server.services.power import Power, now
from vzkit.storage.snapshots import SnapshotStore

MEMORY = "memory.state"


@dataclass(frozen=True)
class Source:
    """A stateful snapshot a new instance starts from (warm start)."""

    record: InstanceRecord
    info: SnapshotInfo
    memory: Path


class SnapshotService:
    def __init__(
        self,
        guard: InstanceGuard,
        engines: Engines,
        power: Power,
        networks: NetworkService,
        events: EventBus,
    ) -> None:
        self.guard = guard
        self.engines = engines
        self.power = power
        self.networks = networks
        self.events = events

    def _store(self, inst: Instance, uuid: str) -> SnapshotStore:
        return SnapshotStore(self.engines.of(inst.type).state_dir(uuid), inst.name)

    def list(self, name: str) -> list[SnapshotInfo]:
        inst, uuid = self.guard.find(name)
        return self._store(inst, uuid).list()

    def get(self, name: str, snapshot: str) -> SnapshotInfo:
        inst, uuid = self.guard.find(name)
        return self._store(inst, uuid).get(snapshot)

    def layers(self, inst: Instance, uuid: str) -> builtins.list[str]:
        """The disk layers ``inst``'s snapshots keep."""
        return [s.layer for s in self._store(inst, uuid).list() if s.layer]

    async def create(self, name: str, snapshot: str | None, *, stateful: bool) -> SnapshotInfo:
        async with self.guard.hold(name) as rec:
            inst = rec.instance
            caps = self.engines.caps(inst.type)
            lifecycle.check("snapshot", name, inst.state)
            memory = None
            if stateful:
                memory = lifecycle.require(
                    "snapshot-stateful", name, inst.state, caps, caps.memory_snapshots
                )
                if inst.volumes:
                    raise InvalidConfig(
                        f"{name!r} has volumes, which a snapshot does not capture: its saved "
                        "memory would not match their content later",
                        hint="detach the volumes for the snapshot, or take one without --stateful",
                    )
            engine = self.engines.of(inst.type)
            store = self._store(inst, rec.uuid)
            snapshot = snapshot or _next_name(store)
            pause = inst.state is InstanceState.RUNNING
            if memory is not None and pause:
                await memory.quiesce(name)
            with store.building(snapshot) as tmp:
                if pause:
                    await engine.pause(name)
                try:
                    captured = await caps.snapshots.capture(inst, rec.uuid, rec.engine_state, tmp)
                    if captured.state != rec.engine_state:
                        self.guard.save_engine_state(name, captured.state)
                    size = captured.size
                    if memory is not None:
                        size += await memory.save_state(name, tmp / MEMORY)
                finally:
                    if pause:
                        with contextlib.suppress(NotFound):
                            await engine.resume(name)
                info = SnapshotInfo(
                    name=snapshot,
                    instance=name,
                    created_at=now(),
                    stateful=stateful,
                    layer=captured.layer,
                    size=size,
                    config={
                        "limits": inst.limits.model_dump(mode="json"),
                        "nics": [n.model_dump(mode="json") for n in inst.nics],
                    },
                )
                store.write_meta(tmp, info)
            self.events.publish("snapshot-created", name, snapshot=snapshot, stateful=stateful)
            return info

    async def restore(self, name: str, snapshot: str) -> Instance:
        """Put the instance back to the snapshot: its disk, and with a stateful snapshot
        its running memory (it continues where it was, no reboot)."""
        async with self.guard.hold(name) as rec:
            inst, uuid = rec.instance, rec.uuid
            caps = self.engines.caps(inst.type)
            lifecycle.check("restore", name, inst.state)
            store = self._store(inst, uuid)
            info = store.get(snapshot)
            if info.stateful and len(info.config.get("nics", [])) != len(inst.nics):
                raise InvalidConfig(
                    f"snapshot {snapshot!r} was taken with {len(info.config['nics'])} network "
                    f"interface(s), {name!r} has {len(inst.nics)} now",
                    hint="attach or detach interfaces to match, then restore",
                )
            was_active = inst.state in lifecycle.ACTIVE
            if was_active:
                inst = await self.power.stop(
                    inst, StateChange(action=StateAction.STOP, force=True, timeout=5)
                )
            self.events.publish("snapshot-restored", name, snapshot=snapshot)
            state = await caps.snapshots.restore(
                inst, uuid, rec.engine_state, store.path(snapshot), info.layer
            )
            self.guard.save_engine_state(name, state)
            if caps.disk_layers is not None:
                await caps.disk_layers.prune(inst, uuid, state, self.layers(inst, uuid))
            if info.stateful:
                inst = self.guard.save(inst, limits=Limits.model_validate(info.config["limits"]))
                return await self.power.start(inst, uuid, state, store.path(snapshot) / MEMORY)
            if was_active:
                return await self.power.start(inst, uuid, state)
            return self.guard.get(name)

    async def delete(self, name: str, snapshot: str) -> None:
        async with self.guard.hold(name) as rec:
            inst, uuid = rec.instance, rec.uuid
            layers = self.engines.caps(inst.type).disk_layers
            store = self._store(inst, uuid)
            info = store.get(snapshot)
            running = inst.state in lifecycle.ACTIVE
            if info.layer and not running and layers is not None:
                # Its children take in its data first: nothing that depends on it breaks.
                await layers.drop(inst, uuid, rec.engine_state, info.layer)
            store.delete(snapshot)
            self.events.publish("snapshot-deleted", name, snapshot=snapshot)
            if not running and layers is not None:
                await layers.prune(inst, uuid, rec.engine_state, self.layers(inst, uuid))

    def source(self, spec: str) -> Source:
        """``INSTANCE/SNAPSHOT`` -> the stateful snapshot to start a new instance from."""
        inst_name, sep, snap = spec.partition("/")
        if not sep or not inst_name or not snap:
            raise InvalidConfig(
                f"invalid snapshot reference {spec!r}", hint="write INSTANCE/SNAPSHOT, e.g. web/s1"
            )
        rec = self.guard.load(inst_name)
        store = self._store(rec.instance, rec.uuid)
        info = store.get(snap)
        if not info.stateful:
            raise InvalidConfig(
                f"snapshot {spec!r} holds no memory state to start from",
                hint=f"take one with: vz snapshot create {inst_name} NAME --stateful",
            )
        return Source(rec, info, store.path(snap) / MEMORY)

    async def freeze(self, rec: InstanceRecord, layers: DiskLayers) -> Frozen | None:
        """Freeze the disk's top (pausing a running instance for the switch) and record
        the new top; the frozen layer never changes again."""
        live = rec.instance.state in lifecycle.ACTIVE
        engine = self.engines.of(rec.instance.type)
        if live:
            await engine.pause(rec.name)
        try:
            frozen = await layers.freeze(rec.instance, rec.uuid, rec.engine_state)
        finally:
            if live:
                await engine.resume(rec.name)
        if frozen is not None:
            self.guard.save_engine_state(rec.name, frozen.live)
        return frozen

    async def copy(self, src: str, dst: str) -> Instance:
        """A new stopped instance with a copy-on-write copy of ``src``'s disk."""
        if self.guard.exists(dst):
            raise Conflict(
                f"an instance named {dst!r} already exists",
                hint=f"choose another name, or delete it first: vz delete {dst}",
            )
        async with self.guard.hold(src) as rec:
            inst, uuid = rec.instance, rec.uuid
            lifecycle.check("copy", src, inst.state)
            engine = self.engines.of(inst.type)
            caps = self.engines.caps(inst.type)
            new_uuid = str(uuidlib.uuid4())
            pause = inst.state is InstanceState.RUNNING
            if pause:
                await engine.pause(src)
            try:
                layer = None
                if caps.disk_layers is not None:
                    # A frozen top gives both instances a fixed base to share.
                    frozen = await caps.disk_layers.freeze(inst, uuid, rec.engine_state)
                    if frozen is not None:
                        self.guard.save_engine_state(src, frozen.live)
                        layer = frozen.layer
                state = await caps.snapshots.clone(uuid, rec.engine_state, layer, new_uuid)
            except BaseException:
                shutil.rmtree(engine.state_dir(new_uuid), ignore_errors=True)
                raise
            finally:
                if pause:
                    with contextlib.suppress(NotFound):
                        await engine.resume(src)
            try:
                copy = self.copy_record(inst, dst, new_uuid)
                self.guard.insert(copy, new_uuid, state)
            except BaseException:
                shutil.rmtree(engine.state_dir(new_uuid), ignore_errors=True)
                raise
        self.events.publish("instance-created", dst, type=copy.type.value, copy_of=src)
        if copy.nics:
            await self.networks.sync()
        return copy

    def copy_record(self, src: Instance, name: str, uuid: str, **changes: object) -> Instance:
        """A stopped instance like ``src`` under a new name, with NICs of its own (fresh
        addresses and MACs) on the same networks; volumes and ports stay with ``src``."""
        inst = Instance(
            name=name,
            type=src.type,
            image=src.image,
            image_digest=src.image_digest,
            limits=src.limits,
            state=InstanceState.STOPPED,
            accel=src.accel,
            created_at=now(),
            firewall=src.firewall,
            security=src.security,  # its files are owned as that mode wrote them
        ).model_copy(update=changes)
        wanted = [NicConfig(network=n.network) for n in src.nics]
        inst.nics = self.networks.resolve_nics(name, uuid, wanted)
        return inst

    async def reconcile(self) -> None:
        """After a daemon start: remove half-built snapshots."""
        for inst in self.guard.instances():
            if self.engines.supports(inst.type):
                self._store(inst, self.guard.uuid(inst.name)).cleanup()


def _next_name(store: SnapshotStore) -> str:
    taken = {s.name for s in store.list()}
    n = 0
    while f"snap{n}" in taken:
        n += 1
    return f"snap{n}"
