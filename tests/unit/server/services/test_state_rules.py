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
Op = Callable[[Daemon], Awaitable[Any]]


def _state(action: StateAction) -> Op:
    return lambda d: d.services.instances.change_state("web", StateChange(action=action))


OPS: dict[str, Op] = {
    "start": _state(StateAction.START),
    "stop": _state(StateAction.STOP),
    "restart": _state(StateAction.RESTART),
    "pause": _state(StateAction.PAUSE),
    "resume": _state(StateAction.RESUME),
    "delete": lambda d: d.services.instances.delete("web"),
    "exec": lambda d: d.services.instances.exec("web", ExecRequest(argv=["true"])),
    "file": lambda d: d.services.instances.pull_file("web", "/etc/hostname"),
    "console": lambda d: d.services.instances.open_console("web"),
    "update": lambda d: d.services.instances.update(
        "web", InstanceUpdate(limits=LimitsUpdate(cpu_weight=200))
    ),
    "volume-attach": lambda d: d.services.volumes.attach("web", VolumeAttachment(volume="data")),
    "nic-attach": lambda d: d.services.networks.attach_nic("web", NicConfig(network="lan")),
    "firewall": lambda d: d.services.networks.set_firewall("web", []),
    "snapshot": lambda d: d.services.snapshots.create("web", "s1", stateful=False),
    "snapshot-stateful": lambda d: d.services.snapshots.create("web", "s1", stateful=True),
    "restore": lambda d: d.services.snapshots.restore("web", "s0"),
    "copy": lambda d: d.services.snapshots.copy("web", "web2"),
    "export": lambda d: d.services.transfers.export("web"),
}


async def _in_state(d: Daemon, state: S, kind: InstanceType = InstanceType.VM) -> None:
    d.nets.add("lan")
    await d.services.volumes.create(VolumeConfig(name="data", size=1 << 20))
    await d.services.volumes.create(VolumeConfig(name="files", size=1 << 20, content="filesystem"))
    await d.services.instances.create(req("web", kind, start=False))
    await d.services.snapshots.create("web", "s0", stateful=False)
    pid = None
    if state in lifecycle.ACTIVE:
        pid = 4242
        d.world.procs["web"] = Proc(pid, d.services.guard.uuid("web"), state is S.PAUSED)
    d.services.guard.save(d.services.instances.get("web"), state=state, pid=pid)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("state", list(S))
async def test_each_operation_is_refused_exactly_where_lifecycle_says(
    daemon: Daemon, op: str, state: S
) -> None:
    await _in_state(daemon, state)
    # A stateful snapshot is a snapshot first.
    rules = ["snapshot", op] if op == "snapshot-stateful" else [op]
    refusing = [r for r in rules if state not in lifecycle.RULES[r].states]
    allowed = not refusing
    try:
        await OPS[op](daemon)
    except StateError as exc:
        assert not allowed, f"{op} refused in {state.value}: {exc.message}"
        with pytest.raises(StateError) as expected:
            lifecycle.check(refusing[0], "web", state)
        assert (exc.message, exc.hint) == (expected.value.message, expected.value.hint)
    except Exception:
        assert allowed, f"{op} in {state.value} failed but not with the state's error"
    else:
        assert allowed, f"{op} ran in {state.value}"


REFUSED: dict[str, tuple[Op, type[VzError]]] = {
    "snapshot-stateful": (OPS["snapshot-stateful"], InvalidConfig),
    "volume-attach": (
        lambda d: d.services.volumes.attach("web", VolumeAttachment(volume="files", path="/d")),
        StateError,
    ),
    "nic-attach": (OPS["nic-attach"], StateError),
    "export": (OPS["export"], StateError),
    "publish": (lambda d: d.services.transfers.publish("web", "img", _no_progress), InvalidConfig),
}


@pytest.mark.parametrize("op", sorted(REFUSED))
async def test_a_missing_capability_answers_with_the_engines_words(daemon: Daemon, op: str) -> None:
    await _in_state(daemon, S.RUNNING, InstanceType.CONTAINER)
    daemon.world.calls.clear()
    call, kind = REFUSED[op]
    with pytest.raises(kind) as err:
        await call(daemon)
    refusal = daemon.engine.caps[InstanceType.CONTAINER].refusals[op]
    assert err.value.message == refusal.message.format(name="web")
    assert err.value.hint == refusal.hint.format(name="web")
    assert daemon.world.calls == []  # refused before the engine was asked anything


async def test_a_stopped_instance_takes_what_it_could_not_take_live(daemon: Daemon) -> None:
    await _in_state(daemon, S.STOPPED, InstanceType.CONTAINER)
    await REFUSED["volume-attach"][0](daemon)
    await OPS["nic-attach"](daemon)
    inst = daemon.services.instances.get("web")
    assert [v.volume for v in inst.volumes] == ["files"] and [n.network for n in inst.nics] == [
        "lan"
    ]
    assert not {"attach_volume", "plug"} & {s for s, _ in daemon.world.calls}


def _no_progress(step: str, fraction: float | None) -> None:
    pass
