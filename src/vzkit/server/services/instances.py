"""Instances: create, delete, state changes, limits, the guest, and what the engines report.

This service owns the instance's life: each operation holds the instance's lock (the
guard), checks the state (vzkit.server.lifecycle), and on failure unwinds what it made so
nothing half-made survives. On a daemon start, :meth:`InstanceService.reconcile` matches
the records with what is really alive; an engine's exit report lands in :meth:`_on_exit`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import uuid as uuidlib
from collections.abc import AsyncIterator

from pydantic import TypeAdapter, ValidationError

from vzkit.api import bounds
from vzkit.api.instances import (
    ExecRequest,
    Instance,
    InstanceCreate,
    InstanceState,
    InstanceUpdate,
    Limits,
    StateAction,
    StateChange,
)
from vzkit.api.networks import NicConfig
from vzkit.engines.base import ConsoleStream, EngineState, ExecSession, ExitInfo
from vzkit.errors import Conflict, InvalidConfig, NotFound
from vzkit.server import lifecycle
from vzkit.server.events import EventBus
from vzkit.server.limits import spooled
from vzkit.server.services.guard import Engines, InstanceGuard
from vzkit.server.services.images import ImageService, Progress
from vzkit.server.services.networks import NetworkService
from vzkit.server.services.power import Power, now
from vzkit.server.services.snapshots import SnapshotService, Source
from vzkit.server.services.volumes import VolumeService
from vzkit.settings import Settings

log = logging.getLogger(__name__)

_LIST = TypeAdapter(list[Instance])


class InstanceService:
    def __init__(
        self,
        settings: Settings,
        guard: InstanceGuard,
        engines: Engines,
        power: Power,
        images: ImageService,
        networks: NetworkService,
        volumes: VolumeService,
        snapshots: SnapshotService,
        events: EventBus,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.engines = engines
        self.power = power
        self.images = images
        self.networks = networks
        self.volumes = volumes
        self.snapshots = snapshots
        self.events = events
        self._listed: tuple[int, bytes] | None = None
        for engine in engines.all():
            engine.set_exit_callback(self._on_exit)

    # -- queries -----------------------------------------------------------------------

    def list(self) -> list[Instance]:
        return self.guard.instances()

    def list_json(self) -> bytes:
        """The list as the API serves it, serialised once per change of any record."""
        generation = self.guard.generation
        if self._listed is None or self._listed[0] != generation:
            self._listed = (generation, _LIST.dump_json(self.guard.instances()))
        return self._listed[1]

    def get(self, name: str) -> Instance:
        return self.guard.get(name)

    # -- create / delete ---------------------------------------------------------------

    def _warm_start(self, req: InstanceCreate) -> tuple[InstanceCreate, Source | None]:
        """A create from a stateful snapshot: the machine is the snapshot's, only the name
        and NICs are new."""
        if not req.source:
            return req, None
        source = self.snapshots.source(req.source)
        snap_nics = source.info.config.get("nics", [])
        req = req.model_copy(
            update={
                "type": source.record.instance.type,
                "image": source.record.instance.image,
                "limits": Limits.model_validate(source.info.config["limits"]),
                "nics": req.nics
                if req.nics is not None
                else [NicConfig(network=n["network"]) for n in snap_nics],
                "start": True,
            }
        )
        if len(req.nics or []) != len(snap_nics):
            raise InvalidConfig(
                f"snapshot {req.source!r} was taken with {len(snap_nics)} network "
                f"interface(s); the new instance must have as many",
                hint="leave out --network to get one on each of the snapshot's networks",
            )
        return req, source

    async def _new_record(
        self, req: InstanceCreate, progress: Progress | None
    ) -> tuple[Instance, str]:
        """The checked record of a new instance, inserted as ``creating``."""
        self.engines.of(req.type)
        name = req.name or f"{req.image}-{secrets.token_hex(3)}"
        if self.guard.exists(name):
            raise Conflict(
                f"an instance named {name!r} already exists",
                hint=f"choose another name, or delete it first: vz delete {name}",
            )
        if req.start:
            # Refused before an image build that would be wasted (checked again below,
            # atomically with the insert).
            self.power.check_fit(req.limits)
        await self.images.ensure(req.image, progress)
        requested = req.nics
        if requested is None:
            default = self.settings.default_network
            requested = [NicConfig(network=default)] if default else []
            if default:
                await self.networks.ensure(default)
        if req.start:
            self.power.check_fit(req.limits)
        uuid = str(uuidlib.uuid4())
        inst = Instance(
            name=name,
            type=req.type,
            image=req.image,
            image_digest=self.images.get(req.image).digest,
            limits=req.limits,
            state=InstanceState.CREATING,
            ephemeral=req.ephemeral,
            accel=req.accel,
            created_at=now(),
            security=req.security,
        )
        for warning in inst.warnings:
            log.warning("%s: %s", name, warning)
        # From the capacity check to the insert there is no await: the checks and the
        # reservations (CPU, memory, addresses, host ports) are atomic on the event loop.
        inst.nics = self.networks.resolve_nics(name, uuid, requested)
        self.volumes.check(inst, req.volumes)
        inst.volumes = list(req.volumes)
        for forward in req.ports:
            inst.ports.append(self.networks.check_forward(inst, forward, inst.ports))
        self.guard.insert(inst, uuid)
        self.events.publish("instance-created", name, type=inst.type.value, image=inst.image)
        return inst, uuid

    async def create(self, req: InstanceCreate, progress: Progress | None = None) -> Instance:
        req, source = self._warm_start(req)
        inst, uuid = await self._new_record(req, progress)
        name = inst.name
        engine = self.engines.of(inst.type)
        async with self.guard.lock(name):
            try:
                if inst.nics:
                    await self.networks.sync()
                state: EngineState
                if source is None:
                    state = await engine.create(inst, uuid)
                else:
                    snaps = self.engines.caps(inst.type).snapshots
                    src = source.record
                    state = await snaps.clone(src.uuid, src.engine_state, source.info.layer, uuid)
                self.guard.save_engine_state(name, state)
                inst = self.guard.save(inst, state=InstanceState.STOPPED)
                if req.start:
                    memory = source.memory if source else None
                    inst = await self.power.start(inst, uuid, state, memory)
            except BaseException:
                with contextlib.suppress(Exception):
                    await engine.destroy(inst, uuid)
                self.guard.remove(name)
                self.events.publish("instance-deleted", name, reason="its creation failed")
                if inst.nics:
                    with contextlib.suppress(Exception):
                        await self.networks.release(name)
                raise
        return inst

    async def delete(self, name: str, *, force: bool = False) -> None:
        async with self.guard.hold(name) as rec:
            inst = rec.instance
            if not force:
                lifecycle.check("delete", name, inst.state)
            await self.engines.of(inst.type).destroy(inst, rec.uuid)
            self.guard.remove(name)
            self.events.publish("instance-deleted", name)
            if inst.nics:
                await self.networks.release(name)
        self.guard.forget(name)
        await self.images.prune_rootfs()

    # -- state -------------------------------------------------------------------------

    async def change_state(self, name: str, change: StateChange) -> Instance:
        async with self.guard.hold(name) as rec:
            inst, uuid = rec.instance, rec.uuid
            action = change.action
            lifecycle.check(action.value, name, inst.state)
            engine = self.engines.of(inst.type)
            if action is StateAction.START:
                self.power.check_fit(inst.limits)
                return await self.power.start(inst, uuid, rec.engine_state)
            if action is StateAction.PAUSE:
                await engine.pause(name)
                return self.guard.save(inst, state=InstanceState.PAUSED)
            if action is StateAction.RESUME:
                await engine.resume(name)
                return self.guard.save(inst, state=InstanceState.RUNNING)
            inst = await self.power.stop(inst, change)
            if action is StateAction.RESTART:
                inst = await self.power.start(inst, uuid, rec.engine_state)
            return inst

    async def update(self, name: str, change: InstanceUpdate) -> Instance:
        """Change an instance's limits; live where the engine can, else refused while running."""
        async with self.guard.hold(name) as rec:
            inst = rec.instance
            lifecycle.check("update", name, inst.state)
            merged = inst.limits.model_dump() | change.limits.model_dump(exclude_none=True)
            try:
                limits = Limits.model_validate(merged)
            except ValidationError as exc:
                raise InvalidConfig(f"invalid limits: {exc.errors()[0]['msg']}") from exc
            try:
                # The request model knows no type; the floor of this instance's applies here.
                bounds.check_memory(limits.memory, inst.type.value)
            except bounds.OutOfBounds as exc:
                raise InvalidConfig(f"invalid limits: {exc}", hint=exc.hint) from exc
            if inst.state in lifecycle.ACTIVE:
                self.power.check_fit(limits, besides=name)
                await self.engines.of(inst.type).update(inst, limits)
            self.events.publish("instance-updated", name, limits=limits.model_dump(mode="json"))
            return self.guard.save(inst, limits=limits)

    async def _on_exit(self, name: str, info: ExitInfo) -> None:
        """An instance's process ended; record why unless an operation already did."""
        async with self.guard.lock(name):
            try:
                inst, uuid = self.guard.find(name)
            except NotFound:
                return
            if inst.pid != info.pid or inst.state not in lifecycle.ACTIVE:
                return
            if inst.ephemeral:
                await self.engines.of(inst.type).destroy(inst, uuid)
                self.guard.remove(name)
                self.events.publish("instance-deleted", name, reason=info.reason)
                if inst.nics:
                    await self.networks.release(name)
                return
            state = InstanceState.STOPPED if info.clean else InstanceState.CRASHED
            if inst.state is InstanceState.STOPPING:
                state = InstanceState.STOPPED
            self.guard.save(inst, state=state, pid=None, reason=info.reason)
            log.info("%s is now %s: %s", name, state.value, info.reason)

    async def reconcile(self) -> None:
        """Match the database with what is really alive (after a daemon restart)."""
        for inst in self.guard.instances():
            try:
                await self._reconcile_one(inst)
            except Exception as exc:
                # One instance in a state vzd cannot sort out must not keep vzd down.
                log.exception("cannot re-attach to %s", inst.name)
                with contextlib.suppress(Exception):
                    self.guard.save(
                        inst,
                        state=InstanceState.ERROR,
                        pid=None,
                        reason=f"vzd could not re-attach to it: {exc}",
                    )

    async def _reconcile_one(self, inst: Instance) -> None:
        if not self.engines.supports(inst.type):
            return
        engine = self.engines.of(inst.type)
        uuid = self.guard.uuid(inst.name)
        if inst.state is InstanceState.CREATING:
            # A create interrupted by a daemon crash: unwind it.
            with contextlib.suppress(Exception):
                await engine.destroy(inst, uuid)
            self.guard.remove(inst.name)
            return
        if inst.state not in lifecycle.ACTIVE:
            return
        observed = await engine.attach(inst, uuid, self.guard.load(inst.name).engine_state)
        if observed is None:
            if inst.ephemeral:
                with contextlib.suppress(Exception):
                    await engine.destroy(inst, uuid)
                self.guard.remove(inst.name)
                return
            if inst.state is InstanceState.STARTING:
                # vzd died during the boot, before QEMU was up (or the engine killed it).
                self._start_lost(inst)
                return
            stopping = inst.state is InstanceState.STOPPING
            self.guard.save(
                inst,
                state=InstanceState.STOPPED if stopping else InstanceState.CRASHED,
                pid=None,
                reason=None if stopping else "its process ended while vzd was not running",
            )
        elif inst.state is InstanceState.STARTING:
            # The agent never answered before the daemon died: the start failed.
            await engine.stop(inst.name, force=True, timeout=1)
            self._start_lost(inst)
        elif observed == "paused" and inst.state is InstanceState.RUNNING:
            # Paused but recorded running: a snapshot was under way when vzd died.
            await engine.resume(inst.name)
            self.guard.save(inst, state=InstanceState.RUNNING)
        else:
            state = InstanceState.PAUSED if observed == "paused" else InstanceState.RUNNING
            self.guard.save(inst, state=state)

    def _start_lost(self, inst: Instance) -> None:
        self.guard.save(
            inst,
            state=InstanceState.ERROR,
            pid=None,
            reason="vzd stopped while the instance was starting",
        )

    # -- guest access ------------------------------------------------------------------

    def _running(self, op: str, name: str) -> Instance:
        inst = self.get(name)
        lifecycle.check(op, name, inst.state)
        return inst

    async def exec(self, name: str, req: ExecRequest) -> ExecSession:
        inst = self._running("exec", name)
        return await self.engines.of(inst.type).exec(name, req)

    async def push_file(
        self, name: str, path: str, data: AsyncIterator[bytes], mode: int, parents: bool
    ) -> None:
        inst = self._running("file", name)
        _check_guest_path(path)
        # Spooled first: an upload cut short (its cap, a full disk) writes nothing in there.
        async with spooled(data, self.settings.state_dir) as body:
            await self.engines.of(inst.type).push_file(name, path, body, mode, parents)

    async def pull_file(self, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        inst = self._running("file", name)
        _check_guest_path(path)
        return await self.engines.of(inst.type).pull_file(name, path)

    async def open_console(self, name: str) -> ConsoleStream:
        inst = self._running("console", name)
        return await self.engines.of(inst.type).open_console(name)

    def console_log(self, name: str) -> bytes:
        inst, uuid = self.guard.find(name)
        return self.engines.of(inst.type).console_log(name, uuid)

    async def close(self) -> None:
        for engine in self.engines.all():
            await engine.close()


def _check_guest_path(path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise InvalidConfig(
            f"invalid guest path {path!r}: it must be absolute",
            hint="write the full path inside the instance, such as /root/file.txt",
        )
