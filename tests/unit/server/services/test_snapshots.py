"""Snapshots, restores and copies over a fake engine: what is paused, frozen, kept, undone."""

from __future__ import annotations

from typing import Any

import pytest

from vzkit.api.instances import InstanceState, InstanceType, StateAction, StateChange
from vzkit.api.networks import NicConfig
from vzkit.api.storage import VolumeAttachment, VolumeConfig
from vzkit.errors import Conflict, EngineError, InvalidConfig, StateError

from ..conftest import Daemon
from ..fakes import FakeState
from .test_instances import req

pytestmark = pytest.mark.anyio

S = InstanceState


def steps(d: Daemon, name: str) -> list[str]:
    return [s for s, n in d.world.calls if n == name]


async def test_a_snapshot_of_a_running_vm_pauses_it_around_the_capture(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web"))
    before = daemon.services.guard.load("web").engine_state
    daemon.world.calls.clear()
    info = await daemon.services.snapshots.create("web", None, stateful=False)
    assert info.name == "snap0" and not info.stateful and info.layer == "root"
    assert steps(daemon, "web") == ["pause", "capture", "freeze", "resume"]
    after = daemon.services.guard.load("web").engine_state
    assert isinstance(after, FakeState) and after != before and after.top is not None
    assert [s.name for s in daemon.services.snapshots.list("web")] == ["snap0"]
    assert daemon.services.instances.get("web").state is S.RUNNING


async def test_a_stateful_snapshot_saves_memory_between_pause_and_resume(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web"))
    daemon.world.calls.clear()
    info = await daemon.services.snapshots.create("web", "s1", stateful=True)
    assert info.stateful and info.size == 6
    assert steps(daemon, "web") == ["quiesce", "pause", "capture", "freeze", "save_state", "resume"]


async def test_a_failed_capture_leaves_no_snapshot_and_resumes(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web"))
    daemon.world.fail["save_state"] = EngineError("disk full")
    with pytest.raises(EngineError):
        await daemon.services.snapshots.create("web", "s1", stateful=True)
    assert daemon.services.snapshots.list("web") == []
    assert not daemon.world.procs["web"].paused
    uuid = daemon.services.guard.uuid("web")
    assert list((daemon.world.dir(uuid) / "snapshots").iterdir()) == []


async def test_stateful_snapshot_rules(daemon: Daemon) -> None:
    snaps = daemon.services.snapshots
    await daemon.services.instances.create(req("off", start=False))
    with pytest.raises(StateError) as err:
        await snaps.create("off", "s", stateful=True)
    assert err.value.message == "a stateful snapshot needs a running instance; 'off' is stopped"
    assert err.value.hint == "start it first (vz start off), or leave out --stateful"
    await daemon.services.instances.create(req("box", InstanceType.CONTAINER, start=False))
    with pytest.raises(InvalidConfig, match="no memory snapshots for 'box'"):
        await snaps.create("box", "s", stateful=True)
    await daemon.services.volumes.create(VolumeConfig(name="data", size=1 << 20))
    await daemon.services.instances.create(req("vol", volumes=[VolumeAttachment(volume="data")]))
    with pytest.raises(InvalidConfig, match="a snapshot does not capture"):
        await snaps.create("vol", "s", stateful=True)
    assert await snaps.create("vol", "s", stateful=False)


async def test_no_snapshot_while_an_operation_is_under_way(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("web", start=False))
    daemon.services.guard.save(daemon.services.instances.get("web"), state=S.ERROR)
    with pytest.raises(StateError) as err:
        await daemon.services.snapshots.create("web", "s", stateful=False)
    assert err.value.message == "cannot snapshot 'web': it is error"
    assert err.value.hint == "wait until it is running or stopped"
    assert err.value.details == {}


async def test_a_container_snapshot_copies_its_files(daemon: Daemon) -> None:
    await daemon.services.instances.create(req("box", InstanceType.CONTAINER))
    info = await daemon.services.snapshots.create("box", "s1", stateful=False)
    assert info.layer is None and info.size == 1
    assert steps(daemon, "box")[-3:] == ["pause", "capture", "resume"]


async def test_restore_of_a_stateful_snapshot_continues_from_memory(daemon: Daemon) -> None:
    svc = daemon.services
    await svc.instances.create(req("web", limits={"memory": "512MiB"}))
    await svc.snapshots.create("web", "s1", stateful=True)
    await svc.instances.update("web", _limits(cpu_weight=500))
    first = daemon.world.procs["web"].pid
    daemon.world.calls.clear()
    inst = await svc.snapshots.restore("web", "s1")
    assert inst.state is S.RUNNING and inst.pid != first
    assert inst.limits.cpu_weight == 100  # the snapshot's limits
    assert steps(daemon, "web") == ["stop", "restore", "prune", "start_from"]


async def test_restore_of_a_disk_snapshot_restarts_what_ran(daemon: Daemon) -> None:
    svc = daemon.services
    await svc.instances.create(req("web"))
    await svc.snapshots.create("web", "s1", stateful=False)
    daemon.world.calls.clear()
    assert (await svc.snapshots.restore("web", "s1")).state is S.RUNNING
    assert steps(daemon, "web") == ["stop", "restore", "prune", "start"]
    await svc.instances.change_state("web", StateChange(action=StateAction.STOP))
    daemon.world.calls.clear()
    assert (await svc.snapshots.restore("web", "s1")).state is S.STOPPED
    assert steps(daemon, "web") == ["restore", "prune"]


async def test_restore_needs_as_many_nics_as_the_snapshot(daemon: Daemon) -> None:
    svc = daemon.services
    daemon.nets.add("lan")
    await svc.instances.create(req("web"))
    await svc.snapshots.create("web", "s1", stateful=True)
    await svc.networks.attach_nic("web", NicConfig(network="lan"))
    with pytest.raises(InvalidConfig, match="taken with 0 network interface"):
        await svc.snapshots.restore("web", "s1")
    assert svc.instances.get("web").state is S.RUNNING


async def test_deleting_a_snapshot_merges_its_layer_only_when_stopped(daemon: Daemon) -> None:
    svc = daemon.services
    await svc.instances.create(req("web"))
    await svc.snapshots.create("web", "s1", stateful=False)
    await svc.snapshots.create("web", "s2", stateful=False)
    daemon.world.calls.clear()
    await svc.snapshots.delete("web", "s1")
    assert steps(daemon, "web") == []
    await svc.instances.change_state("web", StateChange(action=StateAction.STOP))
    daemon.world.calls.clear()
    await svc.snapshots.delete("web", "s2")
    assert steps(daemon, "web") == ["drop", "prune"]
    assert svc.snapshots.list("web") == []


async def test_a_copy_shares_a_frozen_layer_and_is_stopped(daemon: Daemon) -> None:
    svc = daemon.services
    await svc.instances.create(req("web"))
    daemon.world.calls.clear()
    copy = await svc.snapshots.copy("web", "web2")
    assert copy.state is S.STOPPED and copy.type is InstanceType.VM
    assert steps(daemon, "web") == ["pause", "freeze", "resume"]
    src = svc.guard.load("web").engine_state
    dst = svc.guard.load("web2").engine_state
    assert isinstance(src, FakeState) and isinstance(dst, FakeState)
    assert src.top != dst.top and dst.top is not None
    with pytest.raises(Conflict, match="already exists"):
        await svc.snapshots.copy("web", "web2")


async def test_a_failed_copy_leaves_nothing(daemon: Daemon) -> None:
    svc = daemon.services
    await svc.instances.create(req("web"))
    daemon.world.fail["clone"] = EngineError("no space")
    with pytest.raises(EngineError):
        await svc.snapshots.copy("web", "web2")
    assert not daemon.db.exists("web2")
    assert {p.name for p in daemon.world.root.iterdir()} == {svc.guard.uuid("web")}
    assert not daemon.world.procs["web"].paused


def _limits(**kw: Any) -> Any:
    from vzkit.api.instances import InstanceUpdate, LimitsUpdate

    return InstanceUpdate(limits=LimitsUpdate(**kw))
