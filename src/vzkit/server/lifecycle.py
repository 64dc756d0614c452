"""The instance state machine: which operation may run in which state.

Every action checks here first, so a misplaced call fails the same way for every engine
and never half-runs.
"""

from __future__ import annotations

from vzkit.api.instances import InstanceState as S
from vzkit.errors import StateError

# operation -> states it may start from
ALLOWED: dict[str, frozenset[S]] = {
    "start": frozenset({S.STOPPED, S.CRASHED, S.ERROR}),
    "stop": frozenset({S.RUNNING, S.PAUSED, S.STARTING}),
    "restart": frozenset({S.RUNNING, S.PAUSED}),
    "pause": frozenset({S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "exec": frozenset({S.RUNNING}),
    "shell": frozenset({S.RUNNING}),
    "console": frozenset({S.RUNNING, S.PAUSED}),
    "file": frozenset({S.RUNNING}),
    "delete": frozenset({S.STOPPED, S.CRASHED, S.ERROR}),
}

ACTIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING})
"""States in which a QEMU process (or container init) exists and holds resources."""


def _hint(op: str, name: str, state: S) -> str:
    if state is S.PAUSED and op in {"exec", "shell", "file"}:
        return f"resume it first: vz resume {name}"
    if state in {S.STOPPED, S.CRASHED, S.ERROR} and op not in {"start", "delete"}:
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
    if state not in ALLOWED[op]:
        raise StateError(
            f"cannot {_VERB.get(op, op)} {name!r}: it is {state.value}",
            hint=_hint(op, name, state),
            state=state.value,
        )
