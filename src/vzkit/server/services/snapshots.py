"""Snapshots and copies of instances: the operations, on top of the actions layer.

Each operation holds the instance's lock. A running instance is paused around the moment
its state is captured (disk layer frozen, memory saved, container files copied), so the
pieces of a snapshot agree with each other; the snapshot itself is published by one
rename (vzkit.storage.snapshots), so it exists whole or not at all.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vzkit.api.instances import (
    Instance,
    InstanceState,
    InstanceType,
    Limits,
    StateAction,
    StateChange,
)
from vzkit.api.snapshots import SnapshotInfo
from vzkit.errors import Conflict, InvalidConfig, NotFound, StateError
from vzkit.server import lifecycle
from vzkit.storage.snapshots import SnapshotStore

if TYPE_CHECKING:
    from vzkit.server.services.instances import Actions

MEMORY = "memory.state"
_SNAPSHOTTABLE = lifecycle.ACTIVE | {InstanceState.STOPPED, InstanceState.CRASHED}


@dataclass(frozen=True)
class Source:
    """A stateful snapshot a new instance starts from (warm start)."""

    instance: Instance
    uuid: str
    runtime: dict[str, Any]
    info: SnapshotInfo
    memory: Path


class Snapshots:
    def __init__(self, actions: Actions) -> None:
        self.a = actions

    def _store(self, inst: Instance, uuid: str) -> SnapshotStore:
        return SnapshotStore(self.a._engine(inst.type).state_dir(uuid), inst.name)

    def list(self, name: str) -> list[SnapshotInfo]:
        inst, uuid, _ = self.a.db.get(name)
        return self._store(inst, uuid).list()

    def get(self, name: str, snapshot: str) -> SnapshotInfo:
        inst, uuid, _ = self.a.db.get(name)
        return self._store(inst, uuid).get(snapshot)

    async def create(self, name: str, snapshot: str | None, *, stateful: bool) -> SnapshotInfo:
        async with self.a._lock(name):
            inst, uuid, runtime = self.a.db.get(name)
            engine = self.a._engine(inst.type)
            if inst.state not in _SNAPSHOTTABLE:
                raise StateError(
                    f"cannot snapshot {name!r}: it is {inst.state.value}",
                    hint="wait until it is running or stopped",
                )
            if stateful and inst.type is InstanceType.CONTAINER:
                raise InvalidConfig(
                    "containers have no stateful snapshots (their processes are not checkpointed)",
                    hint="take a snapshot without --stateful: it keeps the container's files",
                )
            if stateful and inst.state not in lifecycle.ACTIVE:
                raise StateError(
                    f"a stateful snapshot needs a running instance; {name!r} is {inst.state.value}",
                    hint=f"start it first (vz start {name}), or leave out --stateful",
                )
            if stateful and inst.volumes:
                raise InvalidConfig(
                    f"{name!r} has volumes, which a snapshot does not capture: its saved "
                    "memory would not match their content later",
                    hint="detach the volumes for the snapshot, or take one without --stateful",
                )
            store = self._store(inst, uuid)
            snapshot = snapshot or _next_name(store)
            pause = inst.state is InstanceState.RUNNING
            if stateful and pause:
                await engine.quiesce(name)
            with store.building(snapshot) as tmp:
                if pause:
                    await engine.pause(name)
                try:
                    new_runtime, layer = await engine.snapshot_disk(inst, uuid, runtime, tmp)
                    if new_runtime != runtime:
                        self.a.db.set_runtime(name, new_runtime)
                    size = await engine.save_state(name, tmp / MEMORY) if stateful else 0
                finally:
                    if pause:
                        with contextlib.suppress(NotFound):
                            await engine.resume(name)
                if (tmp / "upper").exists():
                    size += _tree_size(tmp / "upper")
                info = SnapshotInfo(
                    name=snapshot,
                    instance=name,
                    created_at=_now(),
                    stateful=stateful,
                    layer=layer,
                    size=size,
                    config={
                        "limits": inst.limits.model_dump(mode="json"),
                        "nics": [n.model_dump(mode="json") for n in inst.nics],
                    },
                )
                store.write_meta(tmp, info)
            self.a.events.publish("snapshot-created", name, snapshot=snapshot, stateful=stateful)
            return info

    async def restore(self, name: str, snapshot: str) -> Instance:
        """Put the instance back to the snapshot: its disk, and with a stateful snapshot
        its running memory (it continues where it was, no reboot)."""
        async with self.a._lock(name):
            inst, uuid, runtime = self.a.db.get(name)
            engine = self.a._engine(inst.type)
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
                inst = await self.a._stop(
                    inst, StateChange(action=StateAction.STOP, force=True, timeout=5)
                )
            self.a.events.publish("snapshot-restored", name, snapshot=snapshot)
            runtime = await engine.restore_disk(
                inst, uuid, runtime, store.path(snapshot), info.layer
            )
            self.a.db.set_runtime(name, runtime)
            keep = [s.layer for s in store.list() if s.layer]
            await engine.prune_disks(inst, uuid, runtime, keep)
            if info.stateful:
                inst = self.a._save(inst, limits=Limits.model_validate(info.config["limits"]))
                return await self.a._start(inst, uuid, runtime, store.path(snapshot) / MEMORY)
            if was_active:
                return await self.a._start(inst, uuid, runtime)
            return self.a.get(name)

    async def delete(self, name: str, snapshot: str) -> None:
        async with self.a._lock(name):
            inst, uuid, runtime = self.a.db.get(name)
            engine = self.a._engine(inst.type)
            store = self._store(inst, uuid)
            info = store.get(snapshot)
            running = inst.state in lifecycle.ACTIVE
            if info.layer and not running:
                # Its children take in its data first: nothing that depends on it breaks.
                await engine.drop_layer(inst, uuid, runtime, info.layer)
            store.delete(snapshot)
            self.a.events.publish("snapshot-deleted", name, snapshot=snapshot)
            if not running:
                keep = [s.layer for s in store.list() if s.layer]
                await engine.prune_disks(inst, uuid, runtime, keep)

    def source(self, spec: str) -> Source:
        """``INSTANCE/SNAPSHOT`` -> the stateful snapshot to start a new instance from."""
        inst_name, sep, snap = spec.partition("/")
        if not sep or not inst_name or not snap:
            raise InvalidConfig(
                f"invalid snapshot reference {spec!r}", hint="write INSTANCE/SNAPSHOT, e.g. web/s1"
            )
        inst, uuid, runtime = self.a.db.get(inst_name)
        info = self._store(inst, uuid).get(snap)
        if not info.stateful:
            raise InvalidConfig(
                f"snapshot {spec!r} holds no memory state to start from",
                hint=f"take one with: vz snapshot create {inst_name} NAME --stateful",
            )
        memory = self._store(inst, uuid).path(snap) / MEMORY
        return Source(inst, uuid, runtime, info, memory)

    async def copy(self, src: str, dst: str) -> Instance:
        """A new stopped instance with a copy-on-write copy of ``src``'s disk."""
        if self.a.db.exists(dst):
            raise Conflict(
                f"an instance named {dst!r} already exists",
                hint=f"choose another name, or delete it first: vz delete {dst}",
            )
        async with self.a._lock(src):
            inst, uuid, runtime = self.a.db.get(src)
            engine = self.a._engine(inst.type)
            new_uuid = str(uuidlib.uuid4())
            pause = inst.state is InstanceState.RUNNING
            if pause:
                await engine.pause(src)
            try:
                layer = None
                if inst.type is not InstanceType.CONTAINER:
                    # Freezing the top gives both VMs a fixed base to share; a container's
                    # files are copied by clone_disk itself.
                    new_runtime, layer = await engine.snapshot_disk(inst, uuid, runtime, Path())
                    if new_runtime != runtime:
                        self.a.db.set_runtime(src, new_runtime)
                cloned = await engine.clone_disk(uuid, layer, new_uuid)
            except BaseException:
                shutil.rmtree(engine.state_dir(new_uuid), ignore_errors=True)
                raise
            finally:
                if pause:
                    with contextlib.suppress(NotFound):
                        await engine.resume(src)
            copy_runtime = {k: v for k, v in runtime.items() if k != "top"} | cloned
            try:
                copy = self.a.copy_record(inst, dst, new_uuid)
                self.a.db.insert(copy, new_uuid, copy_runtime)
            except BaseException:
                shutil.rmtree(engine.state_dir(new_uuid), ignore_errors=True)
                raise
        self.a.events.publish("instance-created", dst, type=copy.type.value, copy_of=src)
        if copy.nics:
            await self.a._sync_network()
        return copy

    async def reconcile(self) -> None:
        """After a daemon start: remove half-built snapshots."""
        for inst in self.a.db.list():
            _, uuid, _ = self.a.db.get(inst.name)
            engine = self.a.engines.get(inst.type)
            if engine is not None:
                SnapshotStore(engine.state_dir(uuid), inst.name).cleanup()


def _next_name(store: SnapshotStore) -> str:
    taken = {s.name for s in store.list()}
    n = 0
    while f"snap{n}" in taken:
        n += 1
    return f"snap{n}"


def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


def _now() -> datetime:
    return datetime.now(UTC)
