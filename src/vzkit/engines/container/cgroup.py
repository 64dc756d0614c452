"""The container's cgroup on vz-runtime's hot path: make it, remove it. Strings, no pathlib.

:mod:`vzkit.host.cgroups` is the complete model (limits, stats, freeze, kill) shared with
the QEMU engine; it imports pathlib and writes every limit file on create. Here create
writes nothing to a cgroup it has just made unless limits were asked for: a new cgroup
starts unlimited, and on a v1 host each write is an open+write+close in every hierarchy.
Limits, pause, update and stubborn removals go through vzkit.host.cgroups.
"""

from __future__ import annotations

import errno
import os

from vzkit.errors import Conflict, EngineError, InvalidConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ROOT = "/sys/fs/cgroup"
# Same set and order as vzkit.host.cgroups._V1_CONTROLLERS / _V2_CONTROLLERS.
_V1 = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "freezer")
_V2 = ("cpu", "cpuset", "memory", "pids", "io")


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write(path: str, value: str) -> None:
    try:
        # Create + truncate like a shell redirection: what cgroupfs expects, and unit
        # tests can use a plain directory laid out like cgroupfs.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (value or "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise EngineError(
            f"cannot write {value!r} to {path}: {exc.strerror}",
            hint="vz-runtime needs root and a writable /sys/fs/cgroup",
        ) from None


def _parts(path: str) -> list[str]:
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidConfig(
            f"invalid cgroup path {path!r}",
            hint="use a relative path of plain names such as 'vzkit/web'",
        )
    return parts


def hierarchies(root: str = ROOT) -> tuple[int, dict[str, str]]:
    """(cgroup version, {controller: hierarchy root}); on v2 the one tree is under "".
    Co-mounted v1 controllers (cpu,cpuacct) map to the same root."""
    controllers = _read(root + "/cgroup.controllers")
    if controllers is not None and controllers.strip():
        return 2, {"": root}
    out: dict[str, str] = {}
    for name in _V1:
        d = f"{root}/{name}"
        if os.path.exists(d + "/cgroup.procs"):
            out[name] = os.path.realpath(d)
    if not out:
        raise EngineError(
            f"no cgroup v1 controllers are mounted under {root}",
            hint="mount cgroup v1 controllers, or boot with cgroup v2",
        )
    return 1, out


class Made:
    """What create made: the leaf directories and the directories it created."""

    __slots__ = ("dirs", "freezer", "made", "version")

    def __init__(self, version: int, dirs: list[str], made: list[str], freezer: str | None) -> None:
        self.version = version
        self.dirs = dirs
        self.made = made
        self.freezer = freezer

    def procs_files(self) -> list[str]:
        return [d + "/cgroup.procs" for d in self.dirs]

    def freezer_file(self) -> str | None:
        """v2 cgroup.events, v1 freezer.state (what State.frozen reads); None: no freezer."""
        if self.version == 2:
            d = self.dirs[0]
            return d + "/cgroup.events" if os.path.exists(d + "/cgroup.freeze") else None
        return self.freezer


def create(path: str, limits: dict[str, Any], root: str = ROOT) -> Made:
    """Make the cgroup ``path`` in every hierarchy and apply ``limits`` (CgroupLimits
    fields). An existing cgroup is reused when it holds no processes; its limits are then
    reset to ``limits`` like the full driver does."""
    parts = _parts(path)
    version, hier = hierarchies(root)
    dirs: list[str] = []
    made: list[str] = []
    leaf_of: dict[str, str] = {}
    leaf_existed = False
    try:
        for controller, top in hier.items():
            rel = "/".join(parts)
            if top + "/" + rel in dirs:  # co-mounted with an earlier controller
                leaf_of[controller] = top + "/" + rel
                continue
            current = top
            for i, part in enumerate(parts):
                if version == 2:
                    _enable_v2(current)
                current = current + "/" + part
                try:
                    os.mkdir(current)
                    made.append(current)
                except FileExistsError:
                    if i == len(parts) - 1:
                        leaf_existed = True
                except OSError as exc:
                    raise EngineError(
                        f"cannot create cgroup {current}: {exc.strerror}",
                        hint="vz-runtime needs root and a writable /sys/fs/cgroup",
                    ) from None
                if controller == "cpuset":
                    _init_cpuset(current)
            dirs.append(current)
            leaf_of[controller] = current
        freezer = leaf_of.get("freezer")
        group = Made(version, dirs, made, freezer + "/freezer.state" if freezer else None)
        if leaf_existed and _has_procs(dirs):
            raise Conflict(
                f"cgroup {path} already holds processes",
                hint="another container uses this linux.cgroupsPath",
            )
        if limits or leaf_existed:
            from vzkit.host import cgroups

            full = cgroups.detect().open(path)
            if full is not None:
                full.update(cgroups.CgroupLimits(**limits))
    except BaseException:
        for d in reversed(made):
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    return group


def _enable_v2(d: str) -> None:
    wanted_all = (_read(d + "/cgroup.controllers") or "").split()
    enabled = (_read(d + "/cgroup.subtree_control") or "").split()
    missing = [c for c in _V2 if c in wanted_all and c not in enabled]
    if missing:
        _write(d + "/cgroup.subtree_control", " ".join("+" + c for c in missing))


def _init_cpuset(d: str) -> None:
    # A new v1 cpuset starts with empty cpus/mems and refuses tasks (ENOSPC) until both
    # are set; copy the parent's, as cgroup.clone_children would have.
    for name in ("cpuset.mems", "cpuset.cpus"):
        if not (_read(f"{d}/{name}") or "").strip():
            parent = (_read(f"{os.path.dirname(d)}/{name}") or "").strip()
            _write(f"{d}/{name}", parent)


def _has_procs(dirs: list[str]) -> bool:
    for top in dirs:
        for d, _, _ in os.walk(top):
            if (_read(d + "/cgroup.procs") or "").strip():
                return True
    return False


def remove(dirs: list[str]) -> bool:
    """rmdir each leaf; True when all are gone. False (nothing raised) when one is busy
    or has child cgroups: the caller falls back to kill + the full driver's destroy."""
    ok = True
    for d in dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise EngineError(f"cannot remove cgroup {d}: {exc.strerror}") from None
            ok = False
    return ok
