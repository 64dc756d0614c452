"""The instance service over a fake engine: create and its rollback, exits, re-attach."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from vzkit.api.instances import (
    InstanceCreate,
    InstanceState,
    InstanceType,
    InstanceUpdate,
    LimitsUpdate,
    StateAction,
    StateChange,
)
from vzkit.api.networks import NicConfig
from vzkit.errors import Conflict, EngineError, InvalidConfig, NotFound, ResourceExhausted

from ..conftest import Daemon, fake_host
from ..fakes import FakeState

pytestmark = pytest.mark.anyio

S = InstanceState


def req(name: str, kind: InstanceType = InstanceType.VM, **kw: Any) -> InstanceCreate:
    return InstanceCreate.model_validate({"name": name, "type": kind, "nics": [], **kw})


def record_events(d: Daemon) -> list[tuple[str, str | None, dict[str, Any]]]:
    seen: list[tuple[str, str | None, dict[str, Any]]] = []
    publish = d.services.events.publish

    def spy(type: str, instance: str | None = None, /, **data: Any) -> Any:
        seen.append((type, instance, data))
        return publish(type, instance, **data)

    d.services.events.publish = spy  # type: ignore[method-assign]
    return seen


async def test_create_starts_the_instance_and_records_it(daemon: Daemon) -> None:
    events = record_events(daemon)
    inst = await daemon.services.instances.create(req("web"))
    assert inst.state is S.RUNNING and inst.pid == daemon.world.procs["web"].pid
    assert inst.accel == "tcg" and inst.agent_version == "fake" and inst.reason is None
    assert daemon.services.instances.get("web") == inst
    states = [d["state"] for t, _, d in events if t == "instance-state"]
    assert states == ["stopped", "starting", "running"]
    assert events[0][:2] == ("instance-created", "web")


async def test_create_without_start_leaves_it_stopped(daemon: Daemon) -> None:
    inst = await daemon.services.instances.create(req("web", start=False))
    assert inst.state is S.STOPPED and "web" not in daemon.world.procs
    assert daemon.world.calls == [("create", "web")]


@pytest.mark.parametrize("step", ["create", "start"])
@pytest.mark.parametrize("error", [EngineError("boom"), KeyboardInterrupt()])
async def test_a_failed_create_leaves_nothing(
    daemon: Daemon, step: str, error: BaseException
) -> None:
    daemon.nets.add("lan")
    events = record_events(daemon)
    daemon.world.fail[step] = error
    with pytest.raises(type(error)):
        await daemon.services.instances.create(req("web", nics=[NicConfig(network="lan")]))
    _nothing_left(daemon, "web")
    assert daemon.nets.released == ["web"]
    assert events[-1] == ("instance-deleted", "web", {"reason": "its creation failed"})
    assert not any(t == "instance-state" and d["state"] == "running" for t, _, d in events)


async def test_a_failed_network_sync_leaves_nothing(daemon: Daemon) -> None:
    daemon.nets.add("lan")

    def broken() -> None:
        raise OSError("nft failed")

    daemon.nets.sync = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await daemon.services.instances.create(req("web", nics=[NicConfig(network="lan")]))
    _nothing_left(daemon, "web")
    assert ("create", "web") not in daemon.world.calls


async def test_a_failed_warm_start_leaves_nothing(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("src"))
    await daemon.services.snapshots.create("src", "s1", stateful=True)
    for step in ("clone", "start_from"):
        daemon.world.fail = {step: EngineError(step)}
        with pytest.raises(EngineError, match=step):
            await daemon.services.instances.create(req("warm", source="src/s1"))
        _nothing_left(daemon, "warm")
    daemon.world.fail = {}
    warm = await daemon.services.instances.create(req("warm", source="src/s1"))
    assert warm.state is S.RUNNING and ("start_from", "warm") in daemon.world.calls


async def test_checks_before_the_insert_leave_nothing(daemon: Daemon) -> None:
    with pytest.raises(ResourceExhausted):
        await daemon.services.instances.create(req("big", limits={"cpus": 64}))
    with pytest.raises(NotFound, match="unknown image"):
        await daemon.services.instances.create(InstanceCreate(name="x", image="nope", nics=[]))
    with pytest.raises(NotFound, match="network 'missing'"):
        await daemon.services.instances.create(req("n", nics=[NicConfig(network="missing")]))
    for name in ("big", "x", "n"):
        _nothing_left(daemon, name)
    await daemon.services.instances.create(req("web", start=False))
    with pytest.raises(Conflict, match="already exists"):
        await daemon.services.instances.create(req("web"))


def _nothing_left(d: Daemon, name: str) -> None:
    assert not d.db.exists(name)
    assert name not in d.world.procs
    owned = {d.services.guard.uuid(i.name) for i in d.services.instances.list()}
    assert {p.name for p in d.world.root.iterdir()} == owned


async def test_delete_needs_a_stopped_instance_unless_forced(daemon: Daemon) -> None:
    events = record_events(daemon)
    await daemon.services.instances.create(req("web"))
    with pytest.raises(Exception, match="cannot delete 'web': it is running"):
        await daemon.services.instances.delete("web")
    await daemon.services.instances.delete("web", force=True)
    _nothing_left(daemon, "web")
    assert events[-1] == ("instance-deleted", "web", {})


async def test_stop_and_restart(daemon: Daemon) -> None:
    svc = daemon.services.instances
    await svc.create(req("web"))
    first = daemon.world.procs["web"].pid
    again = await svc.change_state("web", StateChange(action=StateAction.RESTART))
    assert again.state is S.RUNNING and again.pid != first
    stopped = await svc.change_state("web", StateChange(action=StateAction.STOP))
    assert stopped.state is S.STOPPED and stopped.pid is None
    assert stopped.reason == "stopped by request"


async def test_a_failed_start_is_recorded_as_error(daemon: Daemon) -> None:
    svc = daemon.services.instances
    await svc.create(req("web", start=False))
    daemon.world.fail["start"] = EngineError("no kernel")
    with pytest.raises(EngineError):
        await svc.change_state("web", StateChange(action=StateAction.START))
    inst = svc.get("web")
    assert inst.state is S.ERROR and inst.reason == "start failed: no kernel"


async def test_update_applies_limits_live_and_checks_capacity(daemon: Daemon) -> None:
    svc = daemon.services.instances
    await svc.create(req("web"))
    inst = await svc.update("web", InstanceUpdate(limits=LimitsUpdate(cpu_weight=300)))
    assert inst.limits.cpu_weight == 300 and ("update", "web") in daemon.world.calls
    with pytest.raises(ResourceExhausted):
        await svc.update("web", InstanceUpdate(limits=LimitsUpdate(cpus=3)))
    assert svc.get("web").limits.cpus == 1


async def test_update_keeps_the_memory_floor_of_the_instance_type(daemon: Daemon) -> None:
    # The request model knows no type: 8 MiB passes it, and a VM would not boot with it.
    svc = daemon.services.instances
    await svc.create(req("web", start=False))
    with pytest.raises(InvalidConfig, match="too small for a vm"):
        await svc.update("web", InstanceUpdate(limits=LimitsUpdate(memory="8MiB")))
    assert svc.get("web").limits.memory == 256 * 1024**2
    await svc.create(req("box", InstanceType.CONTAINER, start=False))
    small = await svc.update("box", InstanceUpdate(limits=LimitsUpdate(memory="8MiB")))
    assert small.limits.memory == 8 * 1024**2


# -- exits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clean", "state"), [(True, S.STOPPED), (False, S.CRASHED)], ids=["power-off", "crash"]
)
async def test_an_exit_is_recorded(daemon: Daemon, clean: bool, state: S) -> None:
    await daemon.services.instances.create(req("web"))
    await daemon.engine.exit("web", clean=clean, reason="why")
    inst = daemon.services.instances.get("web")
    assert (inst.state, inst.pid, inst.reason) == (state, None, "why")


async def test_an_exit_during_a_stop_is_a_stop(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web"))
    inst = daemon.services.guard.save(daemon.services.instances.get("web"), state=S.STOPPING)
    await daemon.engine.exit("web", clean=False)
    assert daemon.services.instances.get("web").state is S.STOPPED
    assert inst.pid is not None


async def test_an_exit_of_an_older_process_is_ignored(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web"))
    daemon.services.guard.save(daemon.services.instances.get("web"), pid=1)
    await daemon.engine.exit("web", clean=False)
    assert daemon.services.instances.get("web").state is S.RUNNING


async def test_an_ephemeral_instance_goes_when_it_exits(daemon: Daemon) -> None:
    events = record_events(daemon)
    await daemon.services.instances.create(req("tmp", ephemeral=True))
    await daemon.engine.exit("tmp", clean=True, reason="the guest powered off")
    _nothing_left(daemon, "tmp")
    assert events[-1] == ("instance-deleted", "tmp", {"reason": "the guest powered off"})


# -- a daemon restart ----------------------------------------------------------------------


async def test_restart_reattaches_to_what_still_runs(daemon: Daemon) -> None:
    svc = daemon.services.instances
    await svc.create(req("up"))
    await svc.create(req("down", start=False))
    await svc.create(req("held"))
    await svc.change_state("held", StateChange(action=StateAction.PAUSE))
    pids = {n: p.pid for n, p in daemon.world.procs.items()}
    d = await daemon.restart()
    got = {i.name: (i.state, i.pid) for i in d.services.instances.list()}
    assert got == {
        "up": (S.RUNNING, pids["up"]),
        "down": (S.STOPPED, None),
        "held": (S.PAUSED, pids["held"]),
    }
    assert {n for s, n in d.world.calls if s == "attach"} >= {"up", "held"}


async def test_restart_records_what_ended_meanwhile(daemon: Daemon) -> None:
    svc = daemon.services.instances
    for name in ("crashed", "stopping", "tmp"):
        await svc.create(req(name, ephemeral=name == "tmp"))
    svc_guard = daemon.services.guard
    svc_guard.save(svc.get("stopping"), state=S.STOPPING)
    daemon.world.procs.clear()  # every process ended while vzd was away
    d = await daemon.restart()
    crashed = d.services.instances.get("crashed")
    assert crashed.state is S.CRASHED and crashed.pid is None
    assert crashed.reason == "its process ended while vzd was not running"
    stopping = d.services.instances.get("stopping")
    assert (stopping.state, stopping.reason) == (S.STOPPED, None)
    assert not d.db.exists("tmp")


async def test_restart_fails_a_start_it_interrupted(daemon: Daemon) -> None:
    svc = daemon.services.instances
    await svc.create(req("booting"))
    await svc.create(req("gone"))
    for name in ("booting", "gone"):
        daemon.services.guard.save(svc.get(name), state=S.STARTING)
    del daemon.world.procs["gone"]
    d = await daemon.restart()
    for name in ("booting", "gone"):
        inst = d.services.instances.get(name)
        assert (
            inst.state is S.ERROR and inst.reason == "vzd stopped while the instance was starting"
        )
    assert "booting" not in d.world.procs  # stopped: the agent never answered
    assert ("stop", "booting") in d.world.calls


async def test_restart_unwinds_a_create_it_interrupted(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("half", start=False))
    daemon.services.guard.save(daemon.services.instances.get("half"), state=S.CREATING)
    d = await daemon.restart()
    _nothing_left(d, "half")


async def test_restart_resumes_a_snapshot_it_interrupted(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web"))
    daemon.world.procs["web"].paused = True  # paused for a snapshot, recorded running
    d = await daemon.restart()
    assert d.services.instances.get("web").state is S.RUNNING
    assert not d.world.procs["web"].paused


async def test_restart_survives_an_instance_it_cannot_reattach(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("bad"))
    await daemon.services.instances.create(req("good"))
    daemon.world.fail["attach"] = EngineError("garbled")
    d = await daemon.restart()  # does not raise
    for name in ("bad", "good"):
        inst = d.services.instances.get(name)
        assert inst.state is S.ERROR and inst.reason == "vzd could not re-attach to it: garbled"


async def test_engine_state_survives_a_restart(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web", start=False))
    await daemon.services.snapshots.create("web", "s1", stateful=False)
    top = daemon.services.guard.load("web").engine_state
    assert isinstance(top, FakeState) and top.top is not None
    d = await daemon.restart()
    assert d.services.guard.load("web").engine_state == top


async def test_containers_get_no_accelerator(daemon: Daemon) -> None:
    inst = await daemon.services.instances.create(req("c", InstanceType.CONTAINER))
    assert inst.accel is None


async def test_guest_paths_must_be_absolute(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web"))

    async def nothing() -> Any:
        return
        yield

    with pytest.raises(InvalidConfig, match="it must be absolute"):
        await daemon.services.instances.push_file("web", "rel/path", nothing(), 0o644, False)
    mode, chunks = await daemon.services.instances.pull_file("web", "/etc/hostname")
    assert mode == 0o644 and [c async for c in chunks] == [b"/etc/hostname"]


async def test_capacity_counts_what_runs(daemon: Daemon) -> None:
    settings = dataclasses.replace(daemon.settings, cpu_overcommit=1.0)
    d = Daemon.start(daemon.world, settings, fake_host(cpus=1))
    await d.services.instances.create(req("one"))
    with pytest.raises(ResourceExhausted):
        await d.services.instances.create(req("two"))
    _nothing_left_of(d, "two")
    await d.services.instances.create(req("two", start=False))
    with pytest.raises(ResourceExhausted):
        await d.services.instances.change_state("two", StateChange(action=StateAction.START))
    await d.services.instances.change_state("one", StateChange(action=StateAction.STOP))
    await d.services.instances.change_state("two", StateChange(action=StateAction.START))
    d.db.close()


def _nothing_left_of(d: Daemon, name: str) -> None:
    assert not d.db.exists(name) and name not in d.world.procs
