"""vzkit.server.lifecycle: misplaced calls fail with a message that reads as a sentence."""

from __future__ import annotations

import pytest

from vzkit.api.instances import InstanceState
from vzkit.engines.base import Capabilities, Refusal
from vzkit.errors import InvalidConfig, StateError
from vzkit.server import lifecycle


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("file", "cannot copy files to or from 'web': it is stopped"),  # was "cannot file"
        ("console", "cannot attach to 'web': it is stopped"),
        ("pause", "cannot pause 'web': it is stopped"),
    ],
)
def test_state_error_messages(op: str, message: str) -> None:
    with pytest.raises(StateError) as err:
        lifecycle.check(op, "web", InstanceState.STOPPED)
    assert err.value.message == message
    assert err.value.hint == "start it first: vz start web"


ALL = list(InstanceState)


@pytest.mark.parametrize("op", sorted(lifecycle.RULES))
@pytest.mark.parametrize("state", ALL)
def test_every_operation_runs_only_in_its_states(op: str, state: InstanceState) -> None:
    allowed = state in lifecycle.RULES[op].states
    if allowed:
        lifecycle.check(op, "web", state)
        return
    with pytest.raises(StateError) as err:
        lifecycle.check(op, "web", state)
    assert "'web'" in err.value.message and state.value in err.value.message
    assert err.value.hint


def test_no_instance_operation_is_missing_from_the_table() -> None:
    assert set(lifecycle.RULES) >= {
        "start", "stop", "restart", "pause", "resume", "delete", "exec", "shell", "console",
        "file", "update", "volume-attach", "volume-detach", "nic-attach", "nic-detach", "port",
        "firewall", "snapshot", "snapshot-stateful", "restore", "copy", "export", "publish",
    }  # fmt: skip


def _caps(**kw: object) -> Capabilities:
    refusals = {
        op: Refusal(InvalidConfig, f"no {op} for {{name!r}}", f"hint for {{name}} ({op})")
        for op in ("snapshot-stateful", "volume-attach", "publish")
    }
    return Capabilities(snapshots=object(), export=object(), refusals=refusals, **kw)  # type: ignore[arg-type]


def test_live_needs_the_capability_only_while_running() -> None:
    caps = _caps()
    assert lifecycle.live("volume-attach", "web", InstanceState.STOPPED, caps, None) is None
    for state in lifecycle.ACTIVE:
        with pytest.raises(InvalidConfig) as err:
            lifecycle.live("volume-attach", "web", state, caps, None)
        assert err.value.message == "no volume-attach for 'web'"
        assert err.value.hint == "hint for web (volume-attach)"
    cap = object()
    caps = _caps(live_volumes=cap)
    assert lifecycle.live("volume-attach", "web", InstanceState.RUNNING, caps, cap) is cap
    assert lifecycle.live("volume-attach", "web", InstanceState.STOPPED, caps, cap) is None


def test_require_asks_for_the_capability_before_the_state() -> None:
    caps = _caps()
    with pytest.raises(InvalidConfig, match="no snapshot-stateful for 'web'"):
        lifecycle.require("snapshot-stateful", "web", InstanceState.STOPPED, caps, None)
    cap = object()
    caps = _caps(memory_snapshots=cap)
    with pytest.raises(StateError, match="needs a running instance"):
        lifecycle.require("snapshot-stateful", "web", InstanceState.STOPPED, caps, cap)
    assert lifecycle.require("snapshot-stateful", "web", InstanceState.PAUSED, caps, cap) is cap


def test_special_rules_keep_their_own_words_and_no_details() -> None:
    with pytest.raises(StateError) as err:
        lifecycle.check("snapshot", "web", InstanceState.CREATING)
    assert err.value.message == "cannot snapshot 'web': it is creating"
    assert err.value.hint == "wait until it is running or stopped"
    assert err.value.details == {}
    with pytest.raises(StateError) as err:
        lifecycle.check("exec", "web", InstanceState.PAUSED)
    assert err.value.details == {"state": "paused"}
    assert err.value.hint == "resume it first: vz resume web"
