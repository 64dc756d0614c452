"""Controlling a created container: kill, delete, pause/resume, update, ps.

``kill --all`` and ``delete --force`` stop a container through its cgroup: freeze it,
signal every process in it, thaw it, until it is empty (cgroups.kill_all), so a fork bomb
cannot outrun the kill: a frozen task cannot fork, and it dies once thawed.
"""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime import cgroups
from vzkit_runtime.errors import EngineError, InvalidConfig, NotFound, StateError
from vzkit_runtime.runtime import noop, remove, stored_hooks
from vzkit_runtime.state import State, container_dir, load, remove_tree

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from collections.abc import Callable

    from vzkit_runtime.spec import Json

    Warn = Callable[[str], None]

_SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6, "BUS": 7,
    "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14,
    "TERM": 15, "STKFLT": 16, "CHLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21,
    "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28,
    "IO": 29, "POLL": 29, "PWR": 30, "SYS": 31,
}  # fmt: skip


def parse_signal(text: str) -> int:
    """KILL, SIGKILL, 9 (and RTMIN+n) -> the number."""
    name = text.strip().upper()
    if name.isdigit():
        num = int(name)
        if 0 < num < 65:
            return num
    name = name.removeprefix("SIG")
    if name in _SIGNALS:
        return _SIGNALS[name]
    if name.startswith("RTMIN"):
        off = name[5:].lstrip("+") or "0"
        if off.isdigit():
            return 34 + int(off)
    raise InvalidConfig(f"unknown signal {text!r}", hint="use a name like TERM or KILL, or 1-64")


def group_of(st: State) -> cgroups.Cgroup:
    group = cgroups.Cgroup.from_record(st.data)
    if group is None:
        raise EngineError(f"container {st.id!r} has no cgroup recorded", hint="delete it")
    return group


def kill(root: str, container_id: str, sig: int, *, all_: bool = False) -> None:
    """Signal the init; with ``all_``, every process in the container's cgroup, frozen
    meanwhile. ``--all`` with SIGKILL returns once the cgroup is empty."""
    st = load(root, container_id)
    if all_:
        # Even a stopped container (its init gone) may have processes left in its cgroup.
        group = group_of(st)
        if sig == 9:
            # Not by killing a pid namespace's init: the kernel then takes seconds to
            # reap a fork bomb (it waits for each process), the freezer milliseconds.
            cgroups.kill_all(group)
        else:
            cgroups.signal_all(group, sig)
        return
    if st.status() == "stopped":
        raise StateError(f"cannot kill container {container_id!r}: it is stopped")
    try:
        os.kill(st.pid, sig)
    except ProcessLookupError:
        raise StateError(f"cannot kill container {container_id!r}: it is stopped") from None


def delete(root: str, container_id: str, *, force: bool = False, warn: Warn = noop) -> None:
    try:
        st = load(root, container_id)
    except NotFound:
        if not force:
            raise
        # As runc: forcing the delete of what is already gone succeeds (podman relies on it
        # after a failed create); a corrupt leftover directory is removed.
        remove_tree(container_dir(root, container_id))
        return
    status = st.status()
    if status in ("running", "paused") and not force:
        raise StateError(
            f"cannot delete container {container_id!r}: it is {status}",
            hint="stop it first (kill), or use delete --force",
        )
    remove(st, status, stored_hooks(st), warn)


def pause(root: str, container_id: str, frozen: bool = True) -> None:
    st = load(root, container_id)
    status = st.status()
    want = "running" if frozen else "paused"
    if status != want:
        verb = "pause" if frozen else "resume"
        raise StateError(f"cannot {verb} container {container_id!r}: it is {status}")
    if not cgroups.freeze(group_of(st), frozen):
        raise EngineError(
            f"cannot {'pause' if frozen else 'resume'} container {container_id!r}: "
            "the host has no cgroup freezer",
            hint="mount the v1 freezer controller, or use cgroup v2 (Linux 5.2+)",
        )


def update(root: str, container_id: str, resources: Json, *, warn: Warn = noop) -> Json:
    """Apply OCI linux.resources live, over what the container has; returns the result.
    Device rules are set once, at create: ``devices`` here is refused."""
    from vzkit_runtime import resources as res

    if not isinstance(resources, dict):
        raise InvalidConfig("update: the resources must be a JSON object")
    if resources.get("devices"):
        raise InvalidConfig(
            "update cannot change linux.resources.devices",
            hint="device rules are set when the container is created; drop devices",
        )
    st = load(root, container_id)
    status = st.status()
    if status == "stopped":
        raise StateError(f"cannot update container {container_id!r}: it is stopped")
    merged = res.merge(st.data.get("resources") or {}, resources)
    res.apply(group_of(st), merged, warn=warn)
    st.data["resources"] = merged
    st.save()
    return merged


def ps(root: str, container_id: str) -> list[int]:
    return group_of(load(root, container_id)).pids()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
