"""The operations users ask for, one typed method each, shared by every API route.

This layer owns the database and the state machine; engines only run things. Each
operation on an instance holds that instance's lock, checks the state (vzkit.server.lifecycle),
and on failure unwinds what it made so nothing half-made survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vzkit.api.host import HostInfo
from vzkit.api.instances import (
    ExecRequest,
    ImageInfo,
    Instance,
    InstanceCreate,
    InstanceState,
    InstanceType,
    InstanceUpdate,
    Limits,
    StateAction,
    StateChange,
)
from vzkit.api.networks import (
    FirewallRule,
    NetworkConfig,
    NetworkUpdate,
    NicConfig,
    PortForward,
    Proto,
)
from vzkit.engines.base import ConsoleStream, Engine, ExecSession, ExitInfo
from vzkit.errors import Conflict, InvalidConfig, NotFound, VzError
from vzkit.host.cgroups import CgroupDriver
from vzkit.host.resources import OvercommitPolicy, check_fit
from vzkit.images.rootfs import prune_rootfs
from vzkit.images.store import ImageStore
from vzkit.network.manager import NetworkManager
from vzkit.network.nics import NetPlan
from vzkit.server import lifecycle
from vzkit.server.db import Database
from vzkit.server.events import EventBus
from vzkit.server.limits import spooled
from vzkit.server.operations import Operations
from vzkit.server.services.snapshots import Snapshots
from vzkit.server.services.transfers import Transfers
from vzkit.server.services.volumes import Volumes
from vzkit.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, float | None], None]


def _now() -> datetime:
    return datetime.now(UTC)


class Actions:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        host: HostInfo,
        images: ImageStore,
        engines: dict[InstanceType, Engine],
        policy: OvercommitPolicy | None = None,
        networks: NetworkManager | None = None,
        cgroups: CgroupDriver | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.host = host
        self.images = images
        self.engines = engines
        self.policy = policy or OvercommitPolicy(
            cpu_overcommit=settings.cpu_overcommit,
            memory_overcommit=settings.memory_overcommit,
        )
        self.networks = networks or NetworkManager(settings, db)
        self.cgroups = cgroups
        self.events = EventBus()
        self.operations = Operations(self.events)
        self.snapshots = Snapshots(self)
        self.volumes = Volumes(self)
        self.transfers = Transfers(self)
        self._network_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._image_locks: dict[str, asyncio.Lock] = {}
        for engine in engines.values():
            engine.set_exit_callback(self._on_exit)

    # -- helpers -----------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _engine(self, kind: InstanceType) -> Engine:
        engine = self.engines.get(kind)
        if engine is None:
            raise InvalidConfig(
                f"instances of type {kind.value!r} are not supported by this daemon",
                hint="use --type " + " or ".join(t.value for t in self.engines),
            )
        return engine

    def _save(self, inst: Instance, **changes: Any) -> Instance:
        new = inst.model_copy(update=changes)
        self.db.update(new)
        if new.state is not inst.state:
            self.events.publish(
                "instance-state",
                new.name,
                state=new.state.value,
                previous=inst.state.value,
                reason=new.reason,
            )
        return new

    def _allocated(self) -> list[Any]:
        busy = lifecycle.ACTIVE | {InstanceState.CREATING}
        return [i.limits for i in self.db.list(busy)]

    # -- queries -----------------------------------------------------------------------

    def list_instances(self) -> list[Instance]:
        return self.db.list()

    def get(self, name: str) -> Instance:
        return self.db.get(name)[0]

    # -- create / delete ---------------------------------------------------------------

    async def create(self, req: InstanceCreate, progress: Progress | None = None) -> Instance:
        source = self.snapshots.source(req.source) if req.source else None
        if source is not None:
            # A warm start: the machine is the snapshot's, only the name and NICs are new.
            snap_nics = source.info.config.get("nics", [])
            req = req.model_copy(
                update={
                    "type": source.instance.type,
                    "image": source.instance.image,
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
        engine = self._engine(req.type)
        name = req.name or f"{req.image}-{secrets.token_hex(3)}"
        if self.db.exists(name):
            raise Conflict(
                f"an instance named {name!r} already exists",
                hint=f"choose another name, or delete it first: vz delete {name}",
            )
        await self.ensure_image(req.image, progress)
        requested = req.nics
        if requested is None:
            default = self.settings.default_network
            requested = [NicConfig(network=default)] if default else []
            if default:
                async with self._network_lock:
                    await asyncio.to_thread(self.networks.ensure, default)
        if req.start:
            check_fit(req.limits, self._allocated(), self.host, self.policy)
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
            created_at=_now(),
        )
        # From the capacity check to the insert there is no await: the checks and the
        # reservations (CPU, memory, addresses, host ports) are atomic on the event loop.
        inst.nics = self.networks.resolve_nics(name, uuid, requested)
        self.volumes.check(inst, req.volumes)
        inst.volumes = list(req.volumes)
        for forward in req.ports:
            inst.ports.append(self.networks.check_forward(inst, forward, inst.ports))
        self.db.insert(inst, uuid)
        self.events.publish("instance-created", name, type=inst.type.value, image=inst.image)
        async with self._lock(name):
            try:
                if inst.nics:
                    await self._sync_network()
                if source is None:
                    runtime = await engine.create(inst, uuid)
                else:
                    cloned = await engine.clone_disk(source.uuid, source.info.layer, uuid)
                    runtime = {k: v for k, v in source.runtime.items() if k != "top"} | cloned
                self.db.set_runtime(name, runtime)
                inst = self._save(inst, state=InstanceState.STOPPED)
                if req.start:
                    restore = source.memory if source else None
                    inst = await self._start(inst, uuid, runtime, restore)
            except BaseException:
                with contextlib.suppress(Exception):
                    await engine.destroy(inst, uuid)
                self.db.delete(name)
                self.events.publish("instance-deleted", name, reason="its creation failed")
                if inst.nics:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.networks.release, name)
                raise
        return inst

    def copy_record(self, src: Instance, name: str, uuid: str, **changes: Any) -> Instance:
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
            created_at=_now(),
            firewall=src.firewall,
        ).model_copy(update=changes)
        wanted = [NicConfig(network=n.network) for n in src.nics]
        inst.nics = self.networks.resolve_nics(name, uuid, wanted)
        return inst

    async def _sync_network(self) -> None:
        """dnsmasq's names and reservations and the nft table, from the database."""
        async with self._network_lock:
            await asyncio.to_thread(self.networks.sync)

    async def delete(self, name: str, *, force: bool = False) -> None:
        async with self._lock(name):
            inst, uuid, _ = self.db.get(name)
            if not force:
                lifecycle.check("delete", name, inst.state)
            await self._engine(inst.type).destroy(inst, uuid)
            self.db.delete(name)
            self.events.publish("instance-deleted", name)
            if inst.nics:
                async with self._network_lock:
                    await asyncio.to_thread(self.networks.release, name)
        self._locks.pop(name, None)
        await self._prune_rootfs()

    # -- state -------------------------------------------------------------------------

    async def change_state(self, name: str, change: StateChange) -> Instance:
        async with self._lock(name):
            inst, uuid, runtime = self.db.get(name)
            action = change.action
            lifecycle.check(action.value, name, inst.state)
            engine = self._engine(inst.type)
            if action is StateAction.START:
                check_fit(inst.limits, self._allocated(), self.host, self.policy)
                return await self._start(inst, uuid, runtime)
            if action is StateAction.PAUSE:
                await engine.pause(name)
                return self._save(inst, state=InstanceState.PAUSED)
            if action is StateAction.RESUME:
                await engine.resume(name)
                return self._save(inst, state=InstanceState.RUNNING)
            inst = await self._stop(inst, change)
            if action is StateAction.RESTART:
                inst = await self._start(inst, uuid, runtime)
            return inst

    async def update(self, name: str, change: InstanceUpdate) -> Instance:
        """Change an instance's limits; live where the engine can, else refused while running."""
        async with self._lock(name):
            inst = self.get(name)
            merged = inst.limits.model_dump() | change.limits.model_dump(exclude_none=True)
            try:
                limits = Limits.model_validate(merged)
            except ValidationError as exc:
                raise InvalidConfig(f"invalid limits: {exc.errors()[0]['msg']}") from exc
            if inst.state in lifecycle.ACTIVE:
                others = [i.limits for i in self.db.list(lifecycle.ACTIVE) if i.name != name]
                check_fit(limits, others, self.host, self.policy)
                await self._engine(inst.type).update(inst, limits)
            self.events.publish("instance-updated", name, limits=limits.model_dump(mode="json"))
            return self._save(inst, limits=limits)

    async def _start(
        self, inst: Instance, uuid: str, runtime: dict[str, Any], restore: Path | None = None
    ) -> Instance:
        # Containers share the host kernel: no accelerator.
        accel = None if inst.type is InstanceType.CONTAINER else inst.accel or self.host.accel
        inst = self._save(inst, state=InstanceState.STARTING, reason=None)
        try:
            started = await self._engine(inst.type).start(
                inst, uuid, runtime, self._plan(inst, uuid), restore, self.volumes.mounts(inst)
            )
        except VzError as exc:
            self._save(
                inst, state=InstanceState.ERROR, reason=f"start failed: {exc.message}", pid=None
            )
            raise
        except BaseException:
            self._save(inst, state=InstanceState.ERROR, reason="start was interrupted", pid=None)
            raise
        return self._save(
            inst,
            state=InstanceState.RUNNING,
            pid=started.pid,
            accel=accel,
            started_at=_now(),
            agent_version=started.agent_version,
            kernel_release=started.kernel_release,
        )

    async def _stop(self, inst: Instance, change: StateChange) -> Instance:
        inst = self._save(inst, state=InstanceState.STOPPING)
        # NotFound: the process is already gone and the exit handler recorded it.
        with contextlib.suppress(NotFound):
            await self._engine(inst.type).stop(
                inst.name, force=change.force, timeout=change.timeout
            )
        return self._save(inst, state=InstanceState.STOPPED, pid=None, reason="stopped by request")

    async def _on_exit(self, name: str, info: ExitInfo) -> None:
        """An instance's process ended; record why unless an operation already did."""
        async with self._lock(name):
            try:
                inst, uuid, _ = self.db.get(name)
            except NotFound:
                return
            if inst.pid != info.pid or inst.state not in lifecycle.ACTIVE:
                return
            if inst.ephemeral:
                await self._engine(inst.type).destroy(inst, uuid)
                self.db.delete(name)
                self.events.publish("instance-deleted", name, reason=info.reason)
                if inst.nics:
                    async with self._network_lock:
                        await asyncio.to_thread(self.networks.release, name)
                return
            state = InstanceState.STOPPED if info.clean else InstanceState.CRASHED
            if inst.state is InstanceState.STOPPING:
                state = InstanceState.STOPPED
            self._save(inst, state=state, pid=None, reason=info.reason)
            log.info("%s is now %s: %s", name, state.value, info.reason)

    async def reconcile(self) -> None:
        """Match the database with what is really alive (after a daemon restart)."""
        for inst in self.db.list():
            try:
                await self._reconcile_one(inst)
            except Exception as exc:
                # One instance in a state vzd cannot sort out must not keep vzd down.
                log.exception("cannot re-attach to %s", inst.name)
                with contextlib.suppress(Exception):
                    self._save(
                        inst,
                        state=InstanceState.ERROR,
                        pid=None,
                        reason=f"vzd could not re-attach to it: {exc}",
                    )

    async def _reconcile_one(self, inst: Instance) -> None:
        _, uuid, runtime = self.db.get(inst.name)
        engine = self.engines.get(inst.type)
        if engine is None:
            return
        if inst.state is InstanceState.CREATING:
            # A create interrupted by a daemon crash: unwind it.
            with contextlib.suppress(Exception):
                await engine.destroy(inst, uuid)
            self.db.delete(inst.name)
            return
        if inst.state not in lifecycle.ACTIVE:
            return
        observed = await engine.attach(inst, uuid, runtime)
        if observed is None:
            if inst.ephemeral:
                with contextlib.suppress(Exception):
                    await engine.destroy(inst, uuid)
                self.db.delete(inst.name)
                return
            if inst.state is InstanceState.STARTING:
                # vzd died during the boot, before QEMU was up (or the engine killed it).
                self._save(
                    inst,
                    state=InstanceState.ERROR,
                    pid=None,
                    reason="vzd stopped while the instance was starting",
                )
                return
            stopping = inst.state is InstanceState.STOPPING
            self._save(
                inst,
                state=InstanceState.STOPPED if stopping else InstanceState.CRASHED,
                pid=None,
                reason=None if stopping else "its process ended while vzd was not running",
            )
        elif inst.state is InstanceState.STARTING:
            # The agent never answered before the daemon died: the start failed.
            await engine.stop(inst.name, force=True, timeout=1)
            self._save(
                inst,
                state=InstanceState.ERROR,
                pid=None,
                reason="vzd stopped while the instance was starting",
            )
        elif observed == "paused" and inst.state is InstanceState.RUNNING:
            # Paused but recorded running: a snapshot was under way when vzd died.
            await engine.resume(inst.name)
            self._save(inst, state=InstanceState.RUNNING)
        else:
            state = InstanceState.PAUSED if observed == "paused" else InstanceState.RUNNING
            self._save(inst, state=state)

    # -- guest access ------------------------------------------------------------------

    def _running(self, op: str, name: str) -> Instance:
        inst = self.get(name)
        lifecycle.check(op, name, inst.state)
        return inst

    async def exec(self, name: str, req: ExecRequest) -> ExecSession:
        inst = self._running("exec", name)
        return await self._engine(inst.type).exec(name, req)

    async def push_file(
        self, name: str, path: str, data: AsyncIterator[bytes], mode: int, parents: bool
    ) -> None:
        inst = self._running("file", name)
        _check_guest_path(path)
        # Spooled first: an upload cut short (its cap, a full disk) writes nothing in there.
        async with spooled(data, self.settings.state_dir) as body:
            await self._engine(inst.type).push_file(name, path, body, mode, parents)

    async def pull_file(self, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        inst = self._running("file", name)
        _check_guest_path(path)
        return await self._engine(inst.type).pull_file(name, path)

    async def open_console(self, name: str) -> ConsoleStream:
        inst = self._running("console", name)
        return await self._engine(inst.type).open_console(name)

    def console_log(self, name: str) -> bytes:
        inst, uuid, _ = self.db.get(name)
        return self._engine(inst.type).console_log(name, uuid)

    # -- images ------------------------------------------------------------------------

    def list_images(self) -> list[ImageInfo]:
        return self.images.list()

    def get_image(self, name: str) -> ImageInfo:
        return self.images.get(name)

    async def ensure_image(self, name: str, progress: Progress | None = None) -> ImageInfo:
        with contextlib.suppress(NotFound):
            return self.images.get(name)
        if name not in self.images.known_names():
            raise NotFound(
                f"unknown image {name!r}",
                hint="available images: " + ", ".join(sorted(self.images.known_names())),
            )
        return await self.build_image(name, progress or (lambda s, f: None))

    async def build_image(self, name: str, progress: Progress, force: bool = False) -> ImageInfo:
        async with self._image_locks.setdefault(name, asyncio.Lock()):
            info = await asyncio.to_thread(self.images.build, name, progress, force)
        await self._prune_rootfs()
        return info

    async def _prune_rootfs(self) -> None:
        """Drop container trees of image versions that nothing uses any more."""
        keep = {i.digest for i in self.images.list()} | {i.image_digest for i in self.db.list()}
        await asyncio.to_thread(prune_rootfs, self.settings, keep)

    async def delete_image(self, name: str) -> None:
        users = [i.name for i in self.db.list() if i.image == name]
        if users:
            raise Conflict(
                f"image {name!r} is used by {len(users)} instance(s): {', '.join(users)}",
                hint="delete those instances first: vz delete " + " ".join(users),
            )
        self.images.delete(name)
        await self._prune_rootfs()

    # -- networks ----------------------------------------------------------------------

    async def create_network(self, config: NetworkConfig) -> NetworkConfig:
        async with self._network_lock:
            net = await asyncio.to_thread(self.networks.create, config)
        self.events.publish("network-created", network=net.name, subnet=str(net.subnet))
        return net

    async def update_network(self, name: str, change: NetworkUpdate) -> NetworkConfig:
        async with self._network_lock:
            net = await asyncio.to_thread(self.networks.update, name, change)
        self.events.publish("network-updated", network=name, **change.model_dump(exclude_none=True))
        return net

    async def delete_network(self, name: str) -> None:
        async with self._network_lock:
            await asyncio.to_thread(self.networks.delete, name)
        self.events.publish("network-deleted", network=name)

    async def supervise_networks(self) -> None:
        async with self._network_lock:
            await asyncio.to_thread(self.networks.supervise)

    async def attach_nic(self, name: str, nic: NicConfig) -> Instance:
        """Add a NIC: live for containers, at the next start for stopped VMs."""
        async with self._lock(name):
            inst, uuid, _ = self.db.get(name)
            new = self.networks.resolve_nics(name, uuid, [nic], inst.nics)
            # Saved before any await: the address is reserved against concurrent requests.
            updated = self._save(inst, nics=[*inst.nics, *new])
            if inst.state in lifecycle.ACTIVE:
                try:
                    plan = self._plan(updated, uuid).nics[-1]
                    await self._engine(inst.type).plug(name, plan)
                except BaseException:
                    self.db.update(inst)
                    raise
        await self._sync_network()
        return updated

    async def detach_nic(self, name: str, network: str) -> Instance:
        """Remove the instance's NICs on ``network`` (and port forwards to them)."""
        async with self._lock(name):
            inst, uuid, _ = self.db.get(name)
            gone = [n for n in inst.nics if n.network == network]
            if not gone:
                raise NotFound(
                    f"instance {name!r} has no interface on network {network!r}",
                    hint=f"see its interfaces: vz info {name}",
                )
            if inst.state in lifecycle.ACTIVE:
                for nic in self._plan(inst.model_copy(update={"nics": gone}), uuid).nics:
                    await self._engine(inst.type).unplug(name, nic)
            ips = {n.ip for n in gone}
            inst = self._save(
                inst,
                nics=[n for n in inst.nics if n.network != network],
                ports=[p for p in inst.ports if p.ip not in ips],
            )
            if inst.state not in lifecycle.ACTIVE:
                for nic in self._plan(inst.model_copy(update={"nics": gone}), uuid).nics:
                    await asyncio.to_thread(self.networks.unplug, nic)
        await self._sync_network()
        return inst

    def _plan(self, inst: Instance, uuid: str) -> NetPlan:
        return self.networks.plan(inst, uuid, tap=inst.type is not InstanceType.CONTAINER)

    async def add_port(self, name: str, forward: PortForward) -> Instance:
        async with self._lock(name):
            inst = self.get(name)
            done = self.networks.check_forward(inst, forward)
            inst = self._save(inst, ports=[*inst.ports, done])
        await self._sync_network()
        return inst

    async def remove_port(self, name: str, host_port: int, proto: Proto) -> Instance:
        async with self._lock(name):
            inst = self.get(name)
            keep = [p for p in inst.ports if (p.host_port, p.proto) != (host_port, proto)]
            if len(keep) == len(inst.ports):
                raise NotFound(
                    f"instance {name!r} has no forward of host port {host_port}/{proto}",
                    hint=f"list them: vz port list {name}",
                )
            inst = self._save(inst, ports=keep)
        await self._sync_network()
        return inst

    async def set_firewall(self, name: str, rules: list[FirewallRule] | None) -> Instance:
        """Replace the allow-list (None: let everything in)."""
        async with self._lock(name):
            inst = self._save(self.get(name), firewall=rules)
        await self._sync_network()
        return inst

    async def add_firewall_rule(self, name: str, rule: FirewallRule) -> Instance:
        async with self._lock(name):
            inst = self.get(name)
            if rule in (inst.firewall or []):
                raise Conflict(f"instance {name!r} already has this rule", hint="vz firewall list")
            inst = self._save(inst, firewall=[*(inst.firewall or []), rule])
        await self._sync_network()
        return inst

    async def remove_firewall_rule(self, name: str, index: int) -> Instance:
        async with self._lock(name):
            inst = self.get(name)
            rules = list(inst.firewall or [])
            if not 0 <= index < len(rules):
                raise NotFound(
                    f"instance {name!r} has no firewall rule {index}",
                    hint=f"rules are numbered from 0: vz firewall list {name}",
                )
            del rules[index]
            inst = self._save(inst, firewall=rules)
        await self._sync_network()
        return inst

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.close()


def _check_guest_path(path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise InvalidConfig(
            f"invalid guest path {path!r}: it must be absolute",
            hint="write the full path inside the instance, such as /root/file.txt",
        )
