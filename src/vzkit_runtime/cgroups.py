"""The container's cgroup: make it, apply ``linux.resources``, freeze it, kill everything
in it, remove it. cgroup v1 (one hierarchy per controller, as on hybrid hosts) and v2 (the
unified tree); plain strings and os calls, no pathlib.

A container's cgroup is a :class:`Cgroup`: its leaf directory per v1 controller (co-mounted
controllers share one), or the one v2 directory (key ``""``). The state file records it
(:meth:`Cgroup.record`), so later commands find it without probing the host again.

``linux.resources`` is applied as runc applies it, field by field in OCI terms (cpu.period
is the period given, memory.reservation is the soft limit...). What the host cannot apply
fails and names the controller, as runc does: a hugetlb limit without the hugetlb
controller, a net_cls class id on cgroup v2. Device rules live in :mod:`devices`.

Writes open the file like a shell redirection (create + truncate): what cgroupfs expects,
and unit tests can use a plain directory laid out like cgroupfs.
"""

from __future__ import annotations

import errno
import time

from vzkit_runtime import _os as os
from vzkit_runtime.errors import Conflict, EngineError, HostUnsupported, InvalidConfig

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from collections.abc import Callable
    from typing import Any

    from vzkit_runtime.devices import Rule

    Json = dict[str, Any]
    Warn = Callable[[str], None]

ROOT = "/sys/fs/cgroup"
#: v1 hierarchies every container gets a directory in.
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "freezer", "devices")
#: v1 hierarchies made only when linux.resources uses them.
V1_OPTIONAL = ("hugetlb", "net_cls", "net_prio")
#: v2 controllers enabled for the container's cgroup where the host has them.
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io", "hugetlb")

_FREEZE_TIMEOUT_S = 5.0
_EMPTY_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------- files


def read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace")
    except (FileNotFoundError, NotADirectoryError):
        return None


def write(path: str, value: str, what: str | None = None) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            # A zero-length write may never reach the kernel's handler; "\n" resets too.
            os.write(fd, (value or "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise EngineError(
            f"cannot set {what or os.path.basename(path)}: write {value!r} to {path}: "
            f"{exc.strerror}",
            hint=_hint(exc.errno or 0),
        ) from None


def _hint(err: int) -> str:
    if err in (errno.EACCES, errno.EPERM):
        return "vz-runtime needs root and a writable /sys/fs/cgroup"
    if err == errno.EINVAL:
        return "the kernel refused the value: check it against the parent cgroup's limits"
    if err == errno.EBUSY:
        return "the cgroup holds processes, or a v2 parent has processes of its own"
    return "check the kernel log (dmesg)"


def split_path(path: str) -> list[str]:
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidConfig(
            f"invalid cgroup path {path!r}",
            hint="use a relative path of plain names such as 'vzkit/web'",
        )
    return parts


def hierarchies(root: str = ROOT) -> tuple[int, dict[str, str]]:
    """(cgroup version, {controller: hierarchy root}); v2's one tree is under "".

    A hybrid host's /sys/fs/cgroup is a tmpfs whose cgroup2 tree (``unified``) has no
    controllers: only a top-level, non-empty cgroup.controllers means v2.
    """
    controllers = read(root + "/cgroup.controllers")
    if controllers is not None and controllers.strip():
        return 2, {"": root}
    out: dict[str, str] = {}
    for name in V1_CONTROLLERS + V1_OPTIONAL:
        d = f"{root}/{name}"
        if os.path.exists(d + "/cgroup.procs"):
            out[name] = os.path.realpath(d)
    if not out:
        raise HostUnsupported(
            f"no cgroup v1 controllers are mounted under {root}",
            hint="mount cgroup v1 controllers, or boot with cgroup v2",
        )
    return 1, out


# ---------------------------------------------------------------------------- the group


class Cgroup:
    """One container's cgroup: {controller: leaf directory}; v2 has the one key ""."""

    __slots__ = ("dirs", "made", "version")

    def __init__(self, version: int, dirs: dict[str, str], made: list[str] | None = None) -> None:
        self.version = version
        self.dirs = dirs
        #: Directories create() made (parents included), for its undo.
        self.made = made or []

    @classmethod
    def from_record(cls, data: Json) -> Cgroup | None:
        dirs = data.get("cgroupDirs")
        if not dirs:
            return None
        return cls(int(data.get("cgroupVersion") or 1), dict(dirs))

    def record(self) -> Json:
        """What the state file keeps (see State: procs files, freezer file, the dirs)."""
        return {
            "cgroupVersion": self.version,
            "cgroupDirs": self.dirs,
            "cgroupProcs": [d + "/cgroup.procs" for d in self.leaves()],
            "freezer": self.freezer_file(),
        }

    def leaves(self) -> list[str]:
        out: list[str] = []
        for d in self.dirs.values():
            if d not in out:
                out.append(d)
        return out

    def dir(self, controller: str) -> str | None:
        return self.dirs.get("" if self.version == 2 else controller)

    def freezer_file(self) -> str | None:
        """v2 cgroup.events, v1 freezer.state (what State.frozen reads); None: no freezer."""
        if self.version == 2:
            top = self.dirs[""]
            return top + "/cgroup.events" if os.path.exists(top + "/cgroup.freeze") else None
        d = self.dirs.get("freezer")
        return d + "/freezer.state" if d else None

    def pids(self, *, one_hierarchy: bool = False) -> list[int]:
        """Processes in the cgroup and its child cgroups, in any hierarchy; or, to poll
        cheaply, in one v1 hierarchy (the freezer's: each holds every process)."""
        tops = self.leaves()
        if one_hierarchy and self.version == 1:
            tops = [self.dirs.get("freezer") or tops[0]]
        found: set[int] = set()
        for top in tops:
            for d, _, _ in os.walk(top):
                text = read(d + "/cgroup.procs") or ""
                found.update(int(x) for x in text.split())
        return sorted(found)


def create(
    path: str, resources: Json, device_rules: list[Rule], *, warn: Warn, root: str = ROOT
) -> Cgroup:
    """Make cgroup ``path`` in every hierarchy, apply ``resources`` and the device rules
    (:func:`devices.rules`). An existing cgroup is reused when it holds no processes."""
    from vzkit_runtime import devices
    from vzkit_runtime import resources as res

    parts = split_path(path)
    version, hier = hierarchies(root)
    wanted = [c for c in hier if c in V1_CONTROLLERS or c in res.optional_controllers(resources)]
    if version == 1:
        res.check_v1_controllers(resources, hier)
    group = Cgroup(version, {})
    leaf_existed = False
    try:
        made_of: dict[str, str] = {}
        for controller in wanted if version == 1 else [""]:
            top = hier[controller]
            if top in made_of:  # co-mounted with an earlier controller
                group.dirs[controller] = made_of[top]
                continue
            leaf, existed = _make(top, parts, version, controller, group.made)
            leaf_existed = leaf_existed or existed
            made_of[top] = group.dirs[controller] = leaf
        if leaf_existed and group.pids():
            raise Conflict(
                f"cgroup {path} already holds processes",
                hint="another container uses this linux.cgroupsPath",
            )
        res.apply(group, resources, warn=warn)
        devices.apply(group, device_rules)
    except BaseException:
        for d in reversed(group.made):
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    return group


def _make(
    top: str, parts: list[str], version: int, controller: str, made: list[str]
) -> tuple[str, bool]:
    """mkdir -p ``parts`` under hierarchy ``top``; (the leaf, whether it existed)."""
    current = top
    existed = False
    for i, part in enumerate(parts):
        if version == 2:
            _enable_v2(current)
        current = current + "/" + part
        try:
            os.mkdir(current)
            made.append(current)
        except FileExistsError:
            existed = i == len(parts) - 1
        except OSError as exc:
            raise EngineError(
                f"cannot create cgroup {current}: {exc.strerror}", hint=_hint(exc.errno or 0)
            ) from None
        if controller == "cpuset":
            _init_cpuset(current)
    return current, existed


def _enable_v2(d: str) -> None:
    available = (read(d + "/cgroup.controllers") or "").split()
    enabled = (read(d + "/cgroup.subtree_control") or "").split()
    missing = [c for c in V2_CONTROLLERS if c in available and c not in enabled]
    if missing:
        write(d + "/cgroup.subtree_control", " ".join("+" + c for c in missing))


def _init_cpuset(d: str) -> None:
    # A new v1 cpuset starts with empty cpus/mems and refuses tasks (ENOSPC) until both
    # are set; copy the parent's, as cgroup.clone_children would have.
    for name in ("cpuset.mems", "cpuset.cpus"):
        if not (read(f"{d}/{name}") or "").strip():
            write(f"{d}/{name}", (read(f"{os.path.dirname(d)}/{name}") or "").strip())


# ---------------------------------------------------------------------------- freeze and kill


def freeze(group: Cgroup, frozen: bool, timeout: float = _FREEZE_TIMEOUT_S) -> bool:
    """Freeze (or thaw) the cgroup and, for a freeze, wait until every task has stopped.
    False when the host has no freezer; EngineError when the freeze does not complete
    in ``timeout`` (the cgroup is thawed again)."""
    target = group.freezer_file()
    if target is None:
        return False
    control = target if group.version == 1 else target[: -len("events")] + "freeze"
    value = ("FROZEN" if frozen else "THAWED") if group.version == 1 else ("1" if frozen else "0")
    write(control, value, "the freezer")
    if not frozen:
        return True
    deadline = time.monotonic() + timeout
    again = time.monotonic() + 0.05
    delay = 0.0002
    while not is_frozen(target):
        if time.monotonic() > deadline:
            write(control, "THAWED" if group.version == 1 else "0", "the freezer")
            raise EngineError("the container's cgroup did not freeze in time")
        time.sleep(delay)
        delay = min(delay * 2, 0.002)
        if group.version == 1 and time.monotonic() > again:
            # v1 can stay FREEZING when a task forked at the wrong moment; asking again
            # freezes the newcomers (not at every poll: each request visits every task).
            write(control, value, "the freezer")
            again = time.monotonic() + 0.05
    return True


def is_frozen(freezer_file: str) -> bool:
    text = read(freezer_file) or ""
    # v1 freezer.state: FROZEN (FREEZING is on its way); v2 cgroup.events: "frozen 1".
    if freezer_file.endswith("freezer.state"):
        return text.strip() == "FROZEN"
    return "frozen 1" in text


def signal_all(group: Cgroup, sig: int) -> set[int]:
    """Send ``sig`` to every process of the cgroup with the cgroup frozen, so none can
    fork a new one meanwhile (a fork bomb cannot outrun the kill), then thaw it: frozen
    tasks act on the signal once thawed. Without a freezer, the signal goes out as is.
    Returns the pids signalled."""
    try:
        frozen = freeze(group, True)
    except EngineError:
        frozen = False  # signal anyway; kill_all loops until the cgroup is empty
    try:
        pids = group.pids()  # complete: nothing in a frozen cgroup can fork
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == 9 and group.version == 2:
            kill = group.dirs[""] + "/cgroup.kill"  # Linux 5.14+: the kernel's own sweep
            if os.path.exists(kill):
                write(kill, "1", "cgroup.kill")
    finally:
        if frozen:
            freeze(group, False)
    return set(pids)


def kill_all(group: Cgroup, timeout: float = _EMPTY_TIMEOUT_S) -> None:
    """SIGKILL everything in the cgroup and wait until it is empty (EngineError after
    ``timeout``). One frozen round reaches every process: one with SIGKILL pending can no
    longer fork. Later rounds are for what was not signalled (processes moved in, or a
    recycled pid, which is why the record is forgotten every half second)."""
    deadline = time.monotonic() + timeout
    forget = time.monotonic() + 0.5
    signalled: set[int] = set()
    delay = 0.0005
    while True:
        pids = group.pids(one_hierarchy=True) or group.pids()
        if not pids:
            return
        if time.monotonic() > deadline:
            raise EngineError(
                f"processes of the container survived SIGKILL for {timeout:g} s: {pids[:10]}",
                hint="a process stuck in the kernel (D state) cannot die; check dmesg",
            )
        if time.monotonic() > forget:
            signalled.clear()
            forget = time.monotonic() + 0.5
        if not signalled.issuperset(pids):
            signalled |= signal_all(group, 9)
            continue
        time.sleep(delay)  # the killed are exiting
        delay = min(delay * 2, 0.005)


# ---------------------------------------------------------------------------- removal


def remove(group: Cgroup) -> bool:
    """rmdir each leaf; True when all are gone. False (nothing raised) when one is busy
    or has child cgroups: the caller falls back to :func:`destroy`."""
    ok = True
    for d in group.leaves():
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise EngineError(f"cannot remove cgroup {d}: {exc.strerror}") from None
            ok = False
    return ok


def destroy(group: Cgroup, timeout: float = _EMPTY_TIMEOUT_S) -> None:
    """Kill everything in the cgroup and remove it with its child cgroups."""
    kill_all(group, timeout)
    for top in group.leaves():
        dirs = [d for d, _, _ in os.walk(top)]
        for d in sorted(dirs, key=lambda p: p.count("/"), reverse=True):
            _rmdir(d, timeout)


def _rmdir(d: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                # cgroupfs answers EBUSY, never ENOTEMPTY: this is a plain directory
                # standing in for it (unit tests), holding regular files.
                for name in os.listdir(d):
                    if os.path.isfile(d + "/" + name):
                        os.unlink(d + "/" + name)
                continue
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise EngineError(f"cannot remove cgroup {d}: {exc.strerror}") from None
            # Killed tasks leave the cgroup asynchronously; give them a moment.
            time.sleep(0.005)
