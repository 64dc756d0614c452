"""Every instance operation, through its service, in every state: refused exactly where
vzkit.server.lifecycle says, with its words; and what an engine without a capability says."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vzkit.api.instances import (
    ExecRequest,
    InstanceState,
    InstanceType,
    InstanceUpdate,
    LimitsUpdate,
    StateAction,
    StateChange,
)
from vzkit.api.networks import NicConfig
from vzkit.api.storage import VolumeAttachment, VolumeConfig
from vzkit.errors import InvalidConfig, StateError, VzError
from vzkit.server import lifecycle

from ..conftest import Daemon
from ..fakes import Proc
from .test_instances import req

pytestmark = pytest.mark.anyio

S = InstanceState
Op = Callable[[Daemon, str], Awaitable[Any]]


def _state(action: StateAction) -> Op:
    return lambda d, n: d.services.instances.change_state(n, StateChange(action=action))


OPS: dict[str, Op] = {
    "start": _state(StateAction.START),
    "stop": _state(StateAction.STOP),
    "restart": _state(StateAction.RESTART),
    "pause": _state(StateAction.PAUSE),
    "resume": _state(StateAction.RESUME),
    "delete": lambda d, n: d.services.instances.delete(n),
    "exec": lambda d, n: d.services.instances.exec(n, ExecRequest(argv=["true"])),
    "file": lambda d, n: d.services.instances.pull_file(n, "/etc/hostname"),
    "console": lambda d, n: d.services.instances.open_console(n),
    "update": lambda d, n: d.services.instances.update(
        n, InstanceUpdate(limits=LimitsUpdate(cpu_weight=200))
    ),
    "volume-attach": lambda d, n: d.services.volumes.attach(
        n, VolumeAttachment(volume="data", readonly=True)
    ),
    "nic-attach": lambda d, n: d.services.networks.attach_nic(n, NicConfig(network="lan")),
    "firewall": lambda d, n: d.services.networks.set_firewall(n, []),
    "snapshot": lambda d, n: d.services.snapshots.create(n, "s1", stateful=False),
    "snapshot-stateful": lambda d, n: d.services.snapshots.create(n, "s1", stateful=True),
    "restore": lambda d, n: d.services.snapshots.restore(n, "s0"),
    "copy": lambda d, n: d.services.snapshots.copy(n, f"{n}-copy"),
    "export": lambda d, n: d.services.transfers.export(n),
}


async def _setup(d: Daemon) -> None:
    d.nets.add("lan")
    await d.services.volumes.create(VolumeConfig(name="data", size=1 << 20))
    await d.services.volumes.create(VolumeConfig(name="files", size=1 << 20, content="filesystem"))


async def _in_state(d: Daemon, name: str, state: S, kind: InstanceType = InstanceType.VM) -> None:
    await d.services.instances.create(req(name, kind, start=False))
    await d.services.snapshots.create(name, "s0", stateful=False)
    pid = None
    if state in lifecycle.ACTIVE:
        pid = next(d.world.pids)
        d.world.procs[name] = Proc(pid, d.services.guard.uuid(name), state is S.PAUSED)
    d.services.guard.save(d.services.instances.get(name), state=state, pid=pid)


@pytest.mark.parametrize("op", sorted(OPS))
async def test_each_operation_is_refused_exactly_where_lifecycle_says(
    daemon: Daemon, op: str
) -> None:
    await _setup(daemon)
    # A stateful snapshot is a snapshot first.
    rules = ["snapshot", op] if op == "snapshot-stateful" else [op]
    for state in S:
        name = f"in-{state.value}"
        await _in_state(daemon, name, state)
        refusing = [r for r in rules if state not in lifecycle.RULES[r].states]
        try:
            await OPS[op](daemon, name)
        except StateError as exc:
            assert refusing, f"{op} refused in {state.value}: {exc.message}"
            with pytest.raises(StateError) as expected:
                lifecycle.check(refusing[0], name, state)
            assert (exc.message, exc.hint) == (expected.value.message, expected.value.hint)
        except Exception as exc:
            assert not refusing, f"{op} in {state.value} failed, not with its state's error: {exc}"
        else:
            assert not refusing, f"{op} ran in {state.value}"


REFUSED: dict[str, tuple[Op, type[VzError]]] = {
    "snapshot-stateful": (OPS["snapshot-stateful"], InvalidConfig),
    "volume-attach": (
        lambda d, n: d.services.volumes.attach(n, VolumeAttachment(volume="files", path="/d")),
        StateError,
    ),
    "nic-attach": (OPS["nic-attach"], StateError),
    "export": (OPS["export"], StateError),
    "publish": (lambda d, n: d.services.transfers.publish(n, "img", _no_progress), InvalidConfig),
}


@pytest.mark.parametrize("op", sorted(REFUSED))
async def test_a_missing_capability_answers_with_the_engines_words(daemon: Daemon, op: str) -> None:
    await _setup(daemon)
    await _in_state(daemon, "web", S.RUNNING, InstanceType.CONTAINER)
    daemon.world.calls.clear()
    call, kind = REFUSED[op]
    with pytest.raises(kind) as err:
        await call(daemon, "web")
    refusal = daemon.engine.caps[InstanceType.CONTAINER].refusals[op]
    assert err.value.message == refusal.message.format(name="web")
    assert err.value.hint == refusal.hint.format(name="web")
    assert daemon.world.calls == []  # refused before the engine was asked anything


async def test_a_stopped_instance_takes_what_it_could_not_take_live(daemon: Daemon) -> None:
    await _setup(daemon)
    await _in_state(daemon, "web", S.STOPPED, InstanceType.CONTAINER)
    await REFUSED["volume-attach"][0](daemon, "web")
    await OPS["nic-attach"](daemon, "web")
    inst = daemon.services.instances.get("web")
    assert [v.volume for v in inst.volumes] == ["files"] and [n.network for n in inst.nics] == [
        "lan"
    ]
    assert not {"attach_volume", "plug"} & {s for s, _ in daemon.world.calls}


def _no_progress(step: str, fraction: float | None) -> None:
    pass
