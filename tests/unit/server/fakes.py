"""An engine that implements the whole contract in memory, for the unit tier.

A :class:`World` stands for the host: which instance processes are alive and what each
instance's files hold. Engines are cheap views of it, so a daemon restart is a new engine
(and new services) over the same world and the same database. Every step can be made to
fail (``world.fail[step] = exc``), and every call is recorded in ``world.calls``.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vzkit.api.instances import (
    Accel,
    ExecRequest,
    ExecResult,
    ImageInfo,
    Instance,
    InstanceType,
    Limits,
)
from vzkit.engines.base import (
    Capabilities,
    Captured,
    ConsoleStream,
    EngineState,
    ExecSession,
    ExitCallback,
    ExitInfo,
    Frozen,
    Refusal,
    Started,
)
from vzkit.errors import EngineError, InvalidConfig, NotFound, StateError
from vzkit.network.nics import NetPlan, NicPlan
from vzkit.storage.manager import VolumeMount

STEPS = (
    "create", "start", "start_from", "attach", "stop", "destroy", "pause", "resume", "update",
    "capture", "restore", "clone", "freeze", "prune", "drop", "quiesce", "save_state",
    "attach_volume", "detach_volume", "resize_volume", "plug", "unplug", "stage", "adopt",
    "flatten",
)  # fmt: skip


class FakeState(EngineState):
    """A disk as a list of layers, the last one written to."""

    top: str | None = None

    @property
    def disk(self) -> str:
        return self.top or "root"


@dataclass
class Proc:
    pid: int
    uuid: str
    paused: bool = False


@dataclass
class World:
    """What is alive and on disk, across daemon restarts."""

    root: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    fail: dict[str, BaseException] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    pids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def step(self, step: str, name: str) -> None:
        assert step in STEPS, step
        self.calls.append((step, name))
        exc = self.fail.get(step)
        if exc is not None:
            raise exc

    def dir(self, uuid: str) -> Path:
        return self.root / uuid


class _Session:
    def __init__(self, argv: list[str]) -> None:
        self._out: list[tuple[int, bytes] | None] = [(1, " ".join(argv).encode()), None]

    async def write_stdin(self, data: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def signal(self, signum: int) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...

    async def read(self) -> tuple[int, bytes] | None:
        return self._out.pop(0)

    async def wait(self) -> ExecResult:
        return ExecResult(exit_code=0)


_REFUSALS = {
    "snapshot-stateful": Refusal(InvalidConfig, "no memory snapshots for {name!r}", "not here"),
    "export": Refusal(StateError, "cannot export {name!r} while it runs", "stop it: {name}"),
    "publish": Refusal(InvalidConfig, "cannot publish {name!r}", "copy it"),
    "volume-attach": Refusal(StateError, "cannot attach to running {name!r}", "stop {name}"),
    "volume-detach": Refusal(StateError, "cannot detach from running {name!r}", "stop {name}"),
    "nic-attach": Refusal(StateError, "no hot-plug in {name!r}", "stop {name}"),
    "nic-detach": Refusal(StateError, "no hot-unplug in {name!r}", "stop {name}"),
}


class FakeEngine:
    """``vm`` instances get every capability (a layered disk, memory snapshots, live
    volumes, publish); ``container`` ones the minimum (files snapshots and export)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._exit_cb: ExitCallback | None = None
        full = Capabilities(
            snapshots=self,
            export=self,
            disk_layers=self,
            memory_snapshots=self,
            live_volumes=self,
            volume_resize=self,
            nic_hotplug=self,
            live_export=self,
            publish=self,
            tap_nics=True,
            block_volumes=True,
            refusals=_REFUSALS,
        )
        least = Capabilities(snapshots=self, export=self, refusals=_REFUSALS)
        self.caps = {InstanceType.VM: full, InstanceType.MICROVM: full}
        self.caps[InstanceType.CONTAINER] = least

    # -- the core ----------------------------------------------------------------------

    def capabilities(self, kind: InstanceType) -> Capabilities:
        return self.caps[kind]

    def load_state(self, data: str) -> EngineState:
        return FakeState.model_validate_json(data)

    def set_exit_callback(self, cb: ExitCallback) -> None:
        self._exit_cb = cb

    async def create(self, inst: Instance, uuid: str) -> EngineState:
        self.world.step("create", inst.name)
        self.world.dir(uuid).mkdir(parents=True)
        (self.world.dir(uuid) / "root").write_text("")
        return FakeState()

    async def start(
        self,
        inst: Instance,
        uuid: str,
        state: EngineState,
        net: NetPlan,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        self.world.step("start", inst.name)
        return self._run(inst, uuid)

    def _run(self, inst: Instance, uuid: str) -> Started:
        if inst.name in self.world.procs:
            raise EngineError(f"{inst.name} already runs")
        proc = Proc(next(self.world.pids), uuid)
        self.world.procs[inst.name] = proc
        accel = None if inst.type is InstanceType.CONTAINER else inst.accel or Accel.TCG
        return Started(pid=proc.pid, agent_version="fake", accel=accel)

    async def attach(self, inst: Instance, uuid: str, state: EngineState) -> str | None:
        self.world.step("attach", inst.name)
        proc = self.world.procs.get(inst.name)
        if proc is None or proc.uuid != uuid:
            return None
        return "paused" if proc.paused else "running"

    async def stop(self, name: str, *, force: bool, timeout: float) -> None:
        self.world.step("stop", name)
        if self.world.procs.pop(name, None) is None:
            raise NotFound(f"{name} is not running")

    async def update(self, inst: Instance, limits: Limits) -> None:
        self.world.step("update", inst.name)

    async def pause(self, name: str) -> None:
        self.world.step("pause", name)
        self._proc(name).paused = True

    async def resume(self, name: str) -> None:
        self.world.step("resume", name)
        self._proc(name).paused = False

    def _proc(self, name: str) -> Proc:
        proc = self.world.procs.get(name)
        if proc is None:
            raise NotFound(f"{name} is not running")
        return proc

    async def exec(self, name: str, req: ExecRequest) -> ExecSession:
        self._proc(name)
        return _Session(req.argv)

    async def push_file(
        self, name: str, path: str, data: AsyncIterator[bytes], mode: int, parents: bool
    ) -> None:
        self._proc(name)
        async for _ in data:
            pass

    async def pull_file(self, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        self._proc(name)

        async def chunks() -> AsyncIterator[bytes]:
            yield path.encode()

        return 0o644, chunks()

    async def open_console(self, name: str) -> ConsoleStream:
        raise EngineError("the fake engine has no console")

    def console_log(self, name: str, uuid: str) -> bytes:
        return f"console of {name}\n".encode()

    def state_dir(self, uuid: str) -> Path:
        return self.world.dir(uuid)

    async def io_stats(self, name: str) -> tuple[int, int] | None:
        return (1, 2) if name in self.world.procs else None

    async def destroy(self, inst: Instance, uuid: str) -> None:
        self.world.step("destroy", inst.name)
        proc = self.world.procs.get(inst.name)
        if proc is not None and proc.uuid == uuid:
            del self.world.procs[inst.name]
        shutil.rmtree(self.world.dir(uuid), ignore_errors=True)

    async def close(self) -> None:
        pass

    async def exit(self, name: str, *, clean: bool, reason: str = "it ended") -> None:
        """The instance's process ends by itself (a guest power-off or a crash)."""
        proc = self.world.procs.pop(name)
        assert self._exit_cb is not None
        await self._exit_cb(name, ExitInfo(proc.pid, clean, reason))

    # -- capabilities ------------------------------------------------------------------

    async def capture(self, inst: Instance, uuid: str, state: EngineState, dest: Path) -> Captured:
        self.world.step("capture", inst.name)
        if inst.type is InstanceType.CONTAINER:
            shutil.copytree(self.world.dir(uuid), dest / "upper", ignore=_snapshots)
            return Captured(state, size=1)
        frozen = await self.freeze(inst, uuid, state)
        assert frozen is not None
        return Captured(frozen.live, frozen.layer)

    async def restore(
        self, inst: Instance, uuid: str, state: EngineState, snapshot: Path, layer: str | None
    ) -> EngineState:
        self.world.step("restore", inst.name)
        if layer is None:
            return state
        new = _layer()
        (self.world.dir(uuid) / new).write_text(layer)
        return FakeState(top=new)

    async def clone(
        self, src_uuid: str, src_state: EngineState, layer: str | None, dst_uuid: str
    ) -> EngineState:
        self.world.step("clone", dst_uuid)
        self.world.dir(dst_uuid).mkdir(parents=True)
        if layer is None:
            return FakeState()
        new = _layer()
        (self.world.dir(dst_uuid) / new).write_text(layer)
        return FakeState(top=new)

    async def freeze(self, inst: Instance, uuid: str, state: EngineState) -> Frozen | None:
        self.world.step("freeze", inst.name)
        st = FakeState.of(state)
        new = _layer()
        (self.world.dir(uuid) / new).write_text(st.disk)
        return Frozen(live=FakeState(top=new), fixed=st, layer=st.disk)

    async def prune(self, inst: Instance, uuid: str, state: EngineState, keep: list[str]) -> None:
        self.world.step("prune", inst.name)

    async def drop(self, inst: Instance, uuid: str, state: EngineState, layer: str) -> None:
        self.world.step("drop", inst.name)

    async def quiesce(self, name: str) -> None:
        self.world.step("quiesce", name)

    async def save_state(self, name: str, dest: Path) -> int:
        self.world.step("save_state", name)
        dest.write_bytes(b"memory")
        return 6

    async def start_from(
        self,
        inst: Instance,
        uuid: str,
        state: EngineState,
        net: NetPlan,
        memory: Path,
        volumes: Sequence[VolumeMount] = (),
    ) -> Started:
        self.world.step("start_from", inst.name)
        assert memory.read_bytes() == b"memory"
        return self._run(inst, uuid)

    async def attach_volume(self, name: str, volume: VolumeMount) -> None:
        self.world.step("attach_volume", name)

    async def detach_volume(self, name: str, volume: VolumeMount) -> None:
        self.world.step("detach_volume", name)

    async def resize_volume(self, name: str, volume: VolumeMount, size: int) -> None:
        self.world.step("resize_volume", name)

    async def plug(self, name: str, nic: NicPlan) -> None:
        self.world.step("plug", name)

    async def unplug(self, name: str, nic: NicPlan) -> None:
        self.world.step("unplug", name)

    def stage(
        self, inst: Instance, uuid: str, state: EngineState, layers: list[str], dest: Path
    ) -> dict[str, str]:
        self.world.step("stage", inst.name)
        for f in self.world.dir(uuid).iterdir():
            if f.is_file():
                (dest / f.name).write_bytes(f.read_bytes())
        top = FakeState.of(state).top
        return {"top": top} if top else {}

    def check_archive(self, files: Path, header: Mapping[str, object]) -> None:
        top = header.get("top")
        if top is not None and not (files / str(top)).is_file():
            raise InvalidConfig(f"the archive's disk {top!r} is missing")

    async def adopt(
        self,
        files: Path,
        header: Mapping[str, object],
        record: Instance,
        local: ImageInfo,
        archived: ImageInfo,
    ) -> EngineState:
        self.world.step("adopt", record.name)
        top = header.get("top")
        return FakeState(top=top if isinstance(top, str) else None)

    def disk(self, inst: Instance, uuid: str, state: EngineState) -> Path:
        path = self.world.dir(uuid) / FakeState.of(state).disk
        if not path.is_file():
            raise InvalidConfig(f"{inst.name!r} has no disk")
        return path

    async def flatten(self, disk: Path, dest: Path, progress: object) -> None:
        self.world.step("flatten", disk.name)
        dest.write_bytes(disk.read_bytes())


_names = itertools.count()


def _layer() -> str:
    return f"layer{next(_names)}"


def _snapshots(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "snapshots"]
