"""The instance state machine: which operation may run in which state, for every operation.

Every service checks here first, so a misplaced call fails the same way for every engine
and never half-runs. An operation may also need a capability of the instance's engine,
always (a stateful snapshot needs memory snapshots) or only while the instance runs (a
volume attached to a running VM needs hot-plug; to a stopped one it is added at the next
start): :func:`require` and :func:`live` check both and hand back the capability, and a
missing one raises what the engine declared for that operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from vzkit.api.instances import InstanceState as S
from vzkit.engines.base import Capabilities
from vzkit.errors import StateError

T = TypeVar("T")

ACTIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING})
"""States in which a QEMU process (or container init) exists and holds resources."""

_ANY = frozenset(S)
_DOWN = frozenset({S.STOPPED, S.CRASHED, S.ERROR})


@dataclass(frozen=True)
class Rule:
    """Where an operation may run. ``message`` and ``hint`` replace the generic error
    (templates of ``name`` and ``state``). ``live`` names the engine capability (a field of
    ``Capabilities``) the operation needs while the instance runs, ``needs`` the one it
    always needs; an engine without it declares a refusal for the operation."""

    states: frozenset[S]
    message: str | None = None
    hint: str | None = None
    live: str | None = None
    needs: str | None = None


RULES: dict[str, Rule] = {
    # state changes
    "start": Rule(_DOWN),
    "stop": Rule(frozenset({S.RUNNING, S.PAUSED, S.STARTING})),
    "restart": Rule(frozenset({S.RUNNING, S.PAUSED})),
    "pause": Rule(frozenset({S.RUNNING})),
    "resume": Rule(frozenset({S.PAUSED})),
    "delete": Rule(_DOWN),
    # the guest
    "exec": Rule(frozenset({S.RUNNING})),
    "shell": Rule(frozenset({S.RUNNING})),
    "console": Rule(frozenset({S.RUNNING, S.PAUSED})),
    "file": Rule(frozenset({S.RUNNING})),
    # configuration: live where the engine can (limits: the engine says which)
    "update": Rule(_ANY),
    "volume-attach": Rule(_ANY, live="live_volumes"),
    "volume-detach": Rule(_ANY, live="live_volumes"),
    "nic-attach": Rule(_ANY, live="nic_hotplug"),
    "nic-detach": Rule(_ANY, live="nic_hotplug"),
    "port": Rule(_ANY),
    "firewall": Rule(_ANY),
    # snapshots, copies, moves
    "snapshot": Rule(
        ACTIVE | {S.STOPPED, S.CRASHED},
        message="cannot snapshot {name!r}: it is {state}",
        hint="wait until it is running or stopped",
    ),
    "snapshot-stateful": Rule(
        ACTIVE,
        message="a stateful snapshot needs a running instance; {name!r} is {state}",
        hint="start it first (vz start {name}), or leave out --stateful",
        needs="memory_snapshots",
    ),
    "restore": Rule(_ANY),  # a running instance is stopped first
    "copy": Rule(_ANY),  # a running instance is paused around the copy
    "export": Rule(_ANY, live="live_export"),
    "publish": Rule(_ANY, needs="publish"),
}


def _hint(op: str, name: str, state: S) -> str:
    if state is S.PAUSED and op in {"exec", "shell", "file"}:
        return f"resume it first: vz resume {name}"
    if state in _DOWN and op not in {"start", "delete"}:
        return f"start it first: vz start {name}"
    if op == "delete":
        return f"stop it first (vz stop {name}) or force it: vz delete --force {name}"
    if state in {S.STARTING, S.STOPPING, S.CREATING}:
        return "wait until the current operation finishes, then try again"
    if op == "start":
        return f"it is already {state.value}; to start it again: vz restart {name}"
    if op == "resume":
        return f"it is not paused; pause it with: vz pause {name}"
    return f"see its state with: vz info {name}"


# How an operation reads in "cannot ... 'web'" where its key is not a verb.
_VERB = {"file": "copy files to or from", "shell": "open a shell in", "console": "attach to"}


def check(op: str, name: str, state: S) -> None:
    """Raise StateError unless ``op`` may run on instance ``name`` in ``state``."""
    rule = RULES[op]
    if state in rule.states:
        return
    if rule.message is not None:
        fields = {"name": name, "state": state.value}
        raise StateError(rule.message.format(**fields), hint=(rule.hint or "").format(**fields))
    raise StateError(
        f"cannot {_VERB.get(op, op)} {name!r}: it is {state.value}",
        hint=_hint(op, name, state),
        state=state.value,
    )


def require(op: str, name: str, state: S, caps: Capabilities, capability: T | None) -> T:
    """Check ``op``, which always needs ``capability`` (of ``caps``); returns it."""
    field = RULES[op].needs
    assert field is not None and id(getattr(caps, field)) == id(capability), field
    if capability is None:
        raise caps.refusals[op].error(name)
    check(op, name, state)
    return capability


def live(op: str, name: str, state: S, caps: Capabilities, capability: T | None) -> T | None:
    """Check ``op``; the ``capability`` (of ``caps``) to do it while the instance runs, or
    None when it does not run (the change applies at its next start)."""
    field = RULES[op].live
    assert field is not None and id(getattr(caps, field)) == id(capability), field
    check(op, name, state)
    if state not in ACTIVE:
        return None
    if capability is None:
        raise caps.refusals[op].error(name)
    return capability
