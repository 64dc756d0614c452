"""Cgroup helpers for cgroup v1 (one hierarchy per controller) and v2 (one tree).

The engine starts QEMU through ``sh -c 'for f in FILES; do echo $$ > $f; done; exec ...'``
with ``Cgroup.procs_files()``, so the process is limited from its first instruction.
Limits are expressed once, in v2 terms (``CgroupLimits``); the v1 driver converts them.

Writes open files like a shell redirection does (create + truncate), which is what
cgroupfs expects and also lets unit tests use a plain directory laid out like cgroupfs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vzkit.errors import EngineError, HostUnsupported, InvalidConfig

__all__ = [
    "CPU_PERIOD_US",
    "Cgroup",
    "CgroupDriver",
    "CgroupLimits",
    "CgroupStats",
    "CgroupV1",
    "CgroupV2",
    "V1Cgroup",
    "V2Cgroup",
    "detect",
    "detect_version",
    "format_cpus",
    "io_weight_to_v1",
    "quota_to_cfs",
    "weight_to_shares",
]


log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
_V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io")
# devices too: vz-runtime makes its containers' cgroups in that hierarchy as well, and
# destroy() must remove a parent there.
_V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "freezer", "devices")
_BUSY_RETRY_S = 1.0
_KILL_WAIT_S = 2.0
_POLL_S = 0.02


def _check(name: str, value: float | None, low: float, high: float | None = None) -> None:
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise InvalidConfig(f"invalid {name} {value!r}: must be {bound}")


@dataclass(frozen=True, kw_only=True)
class CgroupLimits:
    """Limits in cgroup v2 terms; None means unlimited (or the kernel default).

    Immutable and hashable, compared by value.
    """

    memory_max: int | None = None  # bytes of memory
    memory_swap_max: int | None = None  # bytes of swap on top of memory
    cpu_weight: int | None = None  # v2 cpu.weight, 1..10000
    cpu_quota: float | None = None  # CPUs worth of time, e.g. 0.5
    cpuset_cpus: Sequence[int] | None = None  # host CPUs allowed (kept as a tuple)
    pids_max: int | None = None  # maximum number of tasks
    io_weight: int | None = None  # v2 io.weight, 1..10000

    def __post_init__(self) -> None:
        _check("memory_max", self.memory_max, 1)
        _check("memory_swap_max", self.memory_swap_max, 0)
        _check("cpu_weight", self.cpu_weight, 1, 10000)
        _check("pids_max", self.pids_max, 1)
        _check("io_weight", self.io_weight, 1, 10000)
        if self.cpu_quota is not None and self.cpu_quota <= 0:
            raise InvalidConfig(f"invalid cpu_quota {self.cpu_quota!r}: must be > 0")
        if self.cpuset_cpus is not None:
            if not self.cpuset_cpus:
                raise InvalidConfig("invalid cpuset_cpus []: name at least one CPU")
            object.__setattr__(self, "cpuset_cpus", tuple(self.cpuset_cpus))

    def __repr__(self) -> str:
        parts = (f"{k}={v!r}" for k, v in self.as_dict().items() if v is not None)
        return f"CgroupLimits({', '.join(parts)})"

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: object) -> CgroupLimits:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(kw_only=True)
class CgroupStats:
    """Usage counters read from one cgroup."""

    memory_current: int
    memory_peak: int | None
    cpu_usage_ns: int
    pids_current: int
    oom_kills: int


# ---------------------------------------------------------------------------- conversions


def weight_to_shares(weight: int) -> int:
    """v2 cpu.weight (default 100) to v1 cpu.shares (default 1024)."""
    return max(2, min(262_144, weight * 1024 // 100))


def io_weight_to_v1(weight: int) -> int:
    """v2 io.weight (1..10000) to v1 blkio weight (10..1000), the inverse of runc's map."""
    return max(10, min(1000, 10 + (weight - 1) * 990 // 9999))


def quota_to_cfs(cpus: float | None, period_us: int = CPU_PERIOD_US) -> int:
    """CPUs of time per period as a CFS quota in microseconds; -1 is unlimited."""
    if cpus is None:
        return -1
    # The kernel refuses quotas under 1 ms.
    return max(1000, round(cpus * period_us))


def format_cpus(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the cpuset list format)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------------------- file access


def _hint_for(path: Path, err: int) -> str:
    name = path.name
    if err in (errno.EACCES, errno.EPERM):
        return (
            "vzd needs root (CAP_SYS_ADMIN) and a writable /sys/fs/cgroup to manage cgroups; "
            "a missing control file (controller not available) also reads as this"
        )
    if err == errno.EBUSY and name == "cgroup.subtree_control":
        return (
            "cgroup v2 refuses to enable controllers in a cgroup that holds processes; "
            "move them to a leaf cgroup or run vzd in a delegated systemd unit (Delegate=yes)"
        )
    if err == errno.EBUSY:
        return "the cgroup still has processes or child cgroups"
    if err == errno.ENOSPC:
        return "the cpuset has no CPUs or memory nodes; set cpuset.cpus and cpuset.mems first"
    if err == errno.ESRCH:
        return "the process exited before it could be moved"
    if err == errno.EINVAL:
        return "the kernel rejected the value; check it against the parent cgroup's limits"
    if err == errno.ENOENT:
        return "the cgroup was removed while in use"
    return "check the kernel log (dmesg) for details"


def _engine_error(action: str, path: Path, exc: OSError) -> EngineError:
    err = exc.errno or 0
    return EngineError(
        f"cannot {action} {path}: {os.strerror(err)} ({errno.errorcode.get(err, err)})",
        hint=_hint_for(path, err),
        path=str(path),
        errno=err,
    )


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            # A zero-length write may never reach the kernel's handler; "\n" resets too.
            os.write(fd, (value or "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise _engine_error(f"write {value!r} to", path, exc) from exc


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _engine_error("read", path, exc) from exc


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None or not text.strip():
        return None
    value = text.split()[0]
    if value == "max":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """Parse 'key value' lines (cpu.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("-").isdigit():
            out[fields[0]] = int(fields[1])
    return out


def _split(path: str) -> list[str]:
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidConfig(
            f"invalid cgroup path {path!r}",
            hint="use a relative path of plain names such as 'vzkit/web'",
        )
    return parts


def _rmdir_tree(top: Path, timeout: float) -> None:
    """Remove ``top`` and its child cgroups, deepest first; absent is fine."""
    if not top.is_dir():
        return
    dirs = [Path(d) for d, _, _ in os.walk(top)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    # Only a plain directory standing in for cgroupfs (unit tests) holds
                    # regular files; cgroupfs removes its control files itself.
                    for f in d.iterdir():
                        if f.is_file():
                            f.unlink(missing_ok=True)
                    continue
                if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                    # Killed tasks leave the cgroup asynchronously; give them a moment.
                    time.sleep(_POLL_S)
                    continue
                raise _engine_error("remove", d, exc) from exc


def _walk_procs(top: Path) -> Iterator[Path]:
    for d, _, _ in os.walk(top):
        yield Path(d) / "cgroup.procs"


# ---------------------------------------------------------------------------- cgroups


class Cgroup(ABC):
    """One cgroup: a directory per v1 hierarchy, or a single v2 directory."""

    version: Literal[1, 2]

    def __init__(self, path: str, dirs: list[Path]) -> None:
        self.path = path
        self.dirs = dirs

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    def procs_files(self) -> list[Path]:
        """Every cgroup.procs a new process must be written into."""
        return [d / "cgroup.procs" for d in self.dirs]

    def add_pid(self, pid: int) -> None:
        for f in self.procs_files():
            _write(f, str(pid))

    def pids(self) -> list[int]:
        """Processes in this cgroup and its child cgroups, in any hierarchy."""
        found: set[int] = set()
        for d in self.dirs:
            for f in _walk_procs(d):
                found.update(int(x) for x in (_read(f) or "").split() if x.isdigit())
        return sorted(found)

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs)

    def kill(self, timeout: float = _KILL_WAIT_S) -> None:
        """SIGKILL everything in the cgroup and wait (up to ``timeout``) until it is empty."""
        if self._kill_native():
            self._wait_empty(timeout)
            return
        deadline = time.monotonic() + timeout
        # Frozen tasks cannot fork while we signal them; they die when thawed.
        frozen = self._freeze(True)
        try:
            while True:
                pids = self.pids()
                if not pids:
                    return
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if frozen:
                    self._freeze(False)
                    frozen = False
                if time.monotonic() >= deadline:
                    break
                time.sleep(_POLL_S)
        finally:
            if frozen:
                self._freeze(False)
        left = self.pids()
        if left:
            raise EngineError(
                f"cgroup {self.path} still holds {len(left)} process(es) after SIGKILL: "
                f"{', '.join(map(str, left[:10]))}",
                hint="a process stuck in the kernel (state D) cannot be killed; check ps",
            )

    def _wait_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(_POLL_S)

    def destroy(self, timeout: float = _BUSY_RETRY_S) -> None:
        """Remove the cgroup (and child cgroups) in every hierarchy; absent is fine."""
        for d in self.dirs:
            _rmdir_tree(d, timeout)

    def freeze(self, frozen: bool) -> None:
        """Freeze (or thaw) every task; returns once the kernel has been asked."""
        if not self._freeze(frozen):
            raise HostUnsupported(
                f"cannot {'freeze' if frozen else 'thaw'} cgroup {self.path}: no freezer",
                hint="mount the v1 freezer controller, or use cgroup v2 (Linux 5.2+)",
            )

    @abstractmethod
    def freezer_file(self) -> Path | None:
        """The file that tells whether the group is frozen (v1 freezer.state, v2
        cgroup.events), so callers can check without this module; None if no freezer."""

    @abstractmethod
    def update(self, limits: CgroupLimits) -> None:
        """Apply ``limits`` as the complete desired state (None resets to unlimited)."""

    @abstractmethod
    def stats(self) -> CgroupStats: ...

    @abstractmethod
    def _kill_native(self) -> bool:
        """Kill through the kernel's own interface; False when there is none."""

    @abstractmethod
    def _freeze(self, frozen: bool) -> bool:
        """Freeze or thaw; False when the freezer is not available."""


class V1Cgroup(Cgroup):
    version: Literal[1, 2] = 1

    def __init__(self, path: str, hierarchies: dict[str, Path], root_of: dict[str, Path]) -> None:
        unique: list[Path] = []
        for d in hierarchies.values():
            if d not in unique:
                unique.append(d)
        super().__init__(path, unique)
        self.hier = hierarchies
        self._root_of = root_of

    def _file(self, controller: str, name: str) -> Path | None:
        d = self.hier.get(controller)
        return None if d is None else d / name

    def _need(self, controller: str, requested: bool, what: str) -> Path | None:
        d = self.hier.get(controller)
        if d is None and requested:
            raise HostUnsupported(
                f"cannot limit {what}: the cgroup v1 '{controller}' controller is not mounted",
                hint=f"mount it: mount -t cgroup -o {controller} cgroup DIR",
            )
        return d

    def update(self, limits: CgroupLimits) -> None:
        mem = self._need("memory", limits.memory_max is not None, "memory")
        if mem is not None:
            self._set_memory(mem, limits)
        cpu = self._need(
            "cpu", limits.cpu_weight is not None or limits.cpu_quota is not None, "CPU time"
        )
        if cpu is not None:
            _write(cpu / "cpu.shares", str(weight_to_shares(limits.cpu_weight or 100)))
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(quota_to_cfs(limits.cpu_quota)))
        cpuset = self._need("cpuset", limits.cpuset_cpus is not None, "CPUs")
        if cpuset is not None:
            if limits.cpuset_cpus is not None:
                _write(cpuset / "cpuset.cpus", format_cpus(limits.cpuset_cpus))
            else:
                _write(cpuset / "cpuset.cpus", (_read(cpuset.parent / "cpuset.cpus") or "").strip())
        pids = self._need("pids", limits.pids_max is not None, "processes")
        if pids is not None:
            _write(pids / "pids.max", str(limits.pids_max) if limits.pids_max else "max")
        self._set_io(limits.io_weight)

    def _set_memory(self, mem: Path, limits: CgroupLimits) -> None:
        limit = mem / "memory.limit_in_bytes"
        memsw = mem / "memory.memsw.limit_in_bytes"
        has_swap = (self._root_of["memory"] / memsw.name).exists()
        if limits.memory_swap_max is not None and not has_swap:
            log.warning("no swap accounting (memory.memsw.*): memory_swap_max is not applied")
        if not has_swap:
            _write(limit, str(limits.memory_max or -1))
            return
        # v1 counts memory+swap together and demands memsw >= memory at every moment.
        if limits.memory_max is None or limits.memory_swap_max is None:
            total = -1
        else:
            total = limits.memory_max + limits.memory_swap_max
        current_memsw = _read_int(memsw)
        if total == -1 or (current_memsw is not None and total > current_memsw):
            _write(memsw, str(total))
            _write(limit, str(limits.memory_max or -1))
        else:
            _write(limit, str(limits.memory_max or -1))
            _write(memsw, str(total))

    def _set_io(self, weight: int | None) -> None:
        blkio = self.hier.get("blkio")
        if blkio is None:
            if weight is not None:
                log.warning("no blkio controller: io_weight is not applied")
            return
        root = self._root_of["blkio"]
        # CFQ offered blkio.weight; BFQ (the only proportional scheduler since 5.0) offers
        # blkio.bfq.weight, which exists on non-root cgroups only.
        if (root / "blkio.weight").exists():
            name = "blkio.weight"
        elif any(root.glob("blkio.bfq.*")):
            name = "blkio.bfq.weight"
        else:
            if weight is not None:
                log.warning("no proportional I/O scheduler (BFQ): io_weight is not applied")
            return
        target = blkio / name
        if target.exists() or name == "blkio.weight":
            _write(target, str(io_weight_to_v1(weight or 100)))

    def stats(self) -> CgroupStats:
        mem = self.hier.get("memory")
        acct = self.hier.get("cpuacct")
        pids = self.hier.get("pids")
        oom = _read_keyed(mem / "memory.oom_control") if mem else {}
        return CgroupStats(
            memory_current=(_read_int(mem / "memory.usage_in_bytes") or 0) if mem else 0,
            memory_peak=_read_int(mem / "memory.max_usage_in_bytes") if mem else None,
            cpu_usage_ns=(_read_int(acct / "cpuacct.usage") or 0) if acct else 0,
            pids_current=(_read_int(pids / "pids.current") or 0) if pids else len(self.pids()),
            oom_kills=oom.get("oom_kill", 0),
        )

    def _kill_native(self) -> bool:
        return False

    def freezer_file(self) -> Path | None:
        d = self.hier.get("freezer")
        return None if d is None else d / "freezer.state"

    def _freeze(self, frozen: bool) -> bool:
        d = self.hier.get("freezer")
        if d is None or not d.is_dir():
            return False
        _write(d / "freezer.state", "FROZEN" if frozen else "THAWED")
        return True


class V2Cgroup(Cgroup):
    version: Literal[1, 2] = 2

    def __init__(self, path: str, directory: Path, controllers: set[str]) -> None:
        super().__init__(path, [directory])
        self.dir = directory
        self.controllers = controllers

    def _need(self, controller: str, requested: bool, what: str) -> bool:
        if controller in self.controllers:
            return True
        if requested:
            raise HostUnsupported(
                f"cannot limit {what}: the cgroup v2 '{controller}' controller is not available",
                hint="check /sys/fs/cgroup/cgroup.controllers and the kernel configuration",
            )
        return False

    def _write_optional(self, name: str, value: str, requested: bool) -> None:
        # Files that depend on kernel options (swap accounting, io cost model): cgroupfs
        # creates them with the directory, so absence means "not supported here".
        target = self.dir / name
        if target.exists():
            _write(target, value)
        elif requested:
            log.warning("%s does not exist: the limit %r is not applied", target, value)

    def update(self, limits: CgroupLimits) -> None:
        d = self.dir
        if self._need("memory", limits.memory_max is not None, "memory"):
            _write(d / "memory.max", _max(limits.memory_max))
            self._write_optional(
                "memory.swap.max",
                _max(limits.memory_swap_max),
                limits.memory_swap_max is not None,
            )
        if self._need(
            "cpu", limits.cpu_weight is not None or limits.cpu_quota is not None, "CPU time"
        ):
            _write(d / "cpu.weight", str(limits.cpu_weight or 100))
            quota = quota_to_cfs(limits.cpu_quota)
            _write(d / "cpu.max", f"{'max' if quota < 0 else quota} {CPU_PERIOD_US}")
        if self._need("cpuset", limits.cpuset_cpus is not None, "CPUs"):
            # An empty cpuset.cpus means "inherit the parent's".
            cpus = format_cpus(limits.cpuset_cpus) if limits.cpuset_cpus else ""
            _write(d / "cpuset.cpus", cpus)
        if self._need("pids", limits.pids_max is not None, "processes"):
            _write(d / "pids.max", _max(limits.pids_max))
        if "io" in self.controllers:
            self._write_optional(
                "io.weight", f"default {limits.io_weight or 100}", limits.io_weight is not None
            )
        elif limits.io_weight is not None:
            log.warning("no io controller: io_weight is not applied")

    def stats(self) -> CgroupStats:
        d = self.dir
        cpu = _read_keyed(d / "cpu.stat")
        events = _read_keyed(d / "memory.events")
        pids_current = _read_int(d / "pids.current")
        return CgroupStats(
            memory_current=_read_int(d / "memory.current") or 0,
            memory_peak=_read_int(d / "memory.peak"),
            cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
            pids_current=pids_current if pids_current is not None else len(self.pids()),
            oom_kills=events.get("oom_kill", 0),
        )

    def freezer_file(self) -> Path | None:
        target = self.dir / "cgroup.freeze"
        return self.dir / "cgroup.events" if target.exists() else None

    def _kill_native(self) -> bool:
        target = self.dir / "cgroup.kill"  # Linux 5.14+
        if not target.exists():
            return False
        _write(target, "1")
        return True

    def _freeze(self, frozen: bool) -> bool:
        target = self.dir / "cgroup.freeze"  # Linux 5.2+
        if not target.exists():
            return False
        _write(target, "1" if frozen else "0")
        return True


def _max(value: int | None) -> str:
    return "max" if value is None else str(value)


# ---------------------------------------------------------------------------- drivers


class CgroupDriver(ABC):
    """One cgroup hierarchy layout (v1 or v2)."""

    version: Literal[1, 2]
    root: Path

    @abstractmethod
    def create(self, path: str, limits: CgroupLimits) -> Cgroup:
        """Create ``path`` (and its parents) with ``limits``; an existing group is reused."""

    @abstractmethod
    def open(self, path: str) -> Cgroup | None:
        """The existing cgroup at ``path``, or None."""


class CgroupV1(CgroupDriver):
    """Hybrid and legacy hosts: one mounted hierarchy per controller (or co-mounted set)."""

    version: Literal[1, 2] = 1

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root
        # controller -> hierarchy root; co-mounted controllers (cpu,cpuacct) share one.
        self.hierarchies: dict[str, Path] = {}
        for name in _V1_CONTROLLERS:
            d = root / name
            if (d / "cgroup.procs").exists():
                self.hierarchies[name] = d.resolve()
        if not self.hierarchies:
            raise HostUnsupported(
                f"no cgroup v1 controllers are mounted under {root}",
                hint=(
                    "mount cgroup v1 controllers, or boot with cgroup v2 "
                    "(systemd.unified_cgroup_hierarchy=1)"
                ),
            )

    def _group(self, path: str, only_existing: bool = False) -> V1Cgroup:
        rel = Path(*_split(path))
        dirs = {c: h / rel for c, h in self.hierarchies.items()}
        if only_existing:
            dirs = {c: d for c, d in dirs.items() if d.is_dir()}
        return V1Cgroup(path, dirs, self.hierarchies)

    def create(self, path: str, limits: CgroupLimits) -> Cgroup:
        parts = _split(path)
        made: list[Path] = []
        try:
            for controller, hroot in self.hierarchies.items():
                current = hroot
                for part in parts:
                    current = current / part
                    try:
                        current.mkdir()
                        made.append(current)
                    except FileExistsError:
                        pass
                    except OSError as exc:
                        raise _engine_error("create", current, exc) from exc
                    if controller == "cpuset":
                        _init_cpuset(current)
            group = self._group(path)
            group.update(limits)
        except BaseException:
            # Nothing half-made survives: remove only what this call created.
            for d in reversed(made):
                try:
                    _rmdir_tree(d, 0.1)
                except EngineError as exc:
                    log.warning("cleanup after failed cgroup create: %s", exc.message)
            raise
        return group

    def open(self, path: str) -> Cgroup | None:
        group = self._group(path, only_existing=True)
        return group if group.hier else None


def _init_cpuset(d: Path) -> None:
    # A new v1 cpuset starts with empty cpus/mems and refuses tasks (ENOSPC) until both
    # are set; copy the parent's, as cgroup.clone_children would have.
    for name in ("cpuset.mems", "cpuset.cpus"):
        mine = (_read(d / name) or "").strip()
        if not mine:
            parent = (_read(d.parent / name) or "").strip()
            _write(d / name, parent)


class CgroupV2(CgroupDriver):
    """The unified hierarchy: one tree, controllers enabled top-down via subtree_control."""

    version: Literal[1, 2] = 2

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root
        self.available = set((_read(root / "cgroup.controllers") or "").split())

    def _wanted(self) -> list[str]:
        return [c for c in _V2_CONTROLLERS if c in self.available]

    def create(self, path: str, limits: CgroupLimits) -> Cgroup:
        parts = _split(path)
        wanted = self._wanted()
        made: list[Path] = []
        try:
            current = self.root
            for part in parts:
                control = current / "cgroup.subtree_control"
                enabled = {c.lstrip("+") for c in (_read(control) or "").split()}
                missing = [c for c in wanted if c not in enabled]
                if missing:
                    _write(control, " ".join(f"+{c}" for c in missing))
                current = current / part
                try:
                    current.mkdir()
                    made.append(current)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _engine_error("create", current, exc) from exc
            group = V2Cgroup(path, current, set(wanted))
            group.update(limits)
        except BaseException:
            for d in reversed(made):
                try:
                    _rmdir_tree(d, 0.1)
                except EngineError as exc:
                    log.warning("cleanup after failed cgroup create: %s", exc.message)
            raise
        return group

    def open(self, path: str) -> Cgroup | None:
        d = self.root.joinpath(*_split(path))
        if not d.is_dir():
            return None
        controllers = set((_read(d / "cgroup.controllers") or "").split()) or set(self._wanted())
        return V2Cgroup(path, d, controllers)


def detect_version(root: Path = DEFAULT_ROOT) -> Literal[1, 2]:
    """2 when ``root`` is a cgroup2 mount with controllers; else 1 (legacy or hybrid).

    On hybrid hosts ``root`` is a tmpfs and its cgroup2 tree lives at ``root/unified``
    without controllers, so only a top-level, non-empty cgroup.controllers counts.
    """
    controllers = _read(root / "cgroup.controllers")
    return 2 if controllers is not None and controllers.strip() else 1


def detect(root: Path = DEFAULT_ROOT) -> CgroupDriver:
    if detect_version(root) == 2:
        return CgroupV2(root)
    return CgroupV1(root)
