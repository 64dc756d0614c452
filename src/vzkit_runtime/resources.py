"""``linux.resources`` written to cgroup files, v1 and v2, field by field as runc does.

OCI values keep their OCI meaning: 0 (or a missing field) leaves the setting alone, -1
means unlimited; ``cpu.period`` is the period given, ``memory.swap`` counts memory plus
swap (v2's memory.swap.max gets the difference), ``memory.reservation`` is the soft limit
(v1 memory.soft_limit_in_bytes, v2 memory.low). CPU shares map to v2 weights so that
1024 shares are the default weight 100 (vzkit sets shares from its weights).

What the host cannot apply fails, naming the controller, before anything is created:
hugetlb or net_cls/net_prio limits without their v1 hierarchy, blkio weights without an
I/O scheduler that has them, net_cls on cgroup v2, and so on. Settings that v2 does not
have at all (swappiness, disabling the OOM killer) are skipped with a warning, as runc
does. Device rules are :mod:`devices`' business.
"""

from __future__ import annotations

from vzkit_runtime import _os as os
from vzkit_runtime.cgroups import read, write
from vzkit_runtime.errors import HostUnsupported, InvalidConfig

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from collections.abc import Callable
    from typing import Any

    from vzkit_runtime.cgroups import Cgroup

    Json = dict[str, Any]
    Warn = Callable[[str], None]

_THROTTLE = (
    ("throttleReadBpsDevice", "read_bps_device", "rbps"),
    ("throttleWriteBpsDevice", "write_bps_device", "wbps"),
    ("throttleReadIOPSDevice", "read_iops_device", "riops"),
    ("throttleWriteIOPSDevice", "write_iops_device", "wiops"),
)


def merge(base: Json, new: Json) -> Json:
    """``new`` over ``base``: objects merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in new.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def optional_controllers(resources: Json) -> set[str]:
    """The v1 hierarchies outside the usual set that these resources need."""
    need: set[str] = set()
    if resources.get("hugepageLimits"):
        need.add("hugetlb")
    network = resources.get("network") or {}
    if network.get("classID") is not None:
        need.add("net_cls")
    if network.get("priorities"):
        need.add("net_prio")
    return need


def check_v1_controllers(resources: Json, hier: dict[str, str]) -> None:
    """Fail before anything is made when a v1 hierarchy these resources need is missing."""
    for controller in sorted(optional_controllers(resources)):
        if controller not in hier:
            raise _missing(1, controller, _FIELD[controller])


_FIELD = {
    "hugetlb": "hugepageLimits",
    "net_cls": "network.classID",
    "net_prio": "network.priorities",
    "memory": "memory",
    "cpu": "cpu",
    "cpuset": "cpu.cpus/mems",
    "pids": "pids",
    "blkio": "blockIO",
    "io": "blockIO",
}


def _missing(version: int, controller: str, field: str) -> HostUnsupported:
    if version == 1:
        return HostUnsupported(
            f"cannot set linux.resources.{field}: the cgroup v1 {controller!r} controller "
            "is not mounted on this host",
            hint=f"mount it (mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/"
            f"{controller}), or drop linux.resources.{field}",
        )
    return HostUnsupported(
        f"cannot set linux.resources.{field}: the cgroup v2 {controller!r} controller "
        "is not available here",
        hint=f"check cgroup.controllers of the parent cgroup, or drop linux.resources.{field}",
    )


def _int(section: Json, key: str, where: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfig(f"linux.resources.{where}.{key} must be an integer, not {value!r}")
    return value


def apply(group: Cgroup, resources: Json, *, warn: Warn) -> None:
    """Write ``resources`` (without devices) to ``group``'s files."""
    if not any(v for k, v in resources.items() if k != "devices"):
        return  # a new cgroup starts unlimited: nothing to write
    if resources.get("rdma"):
        raise HostUnsupported(
            "linux.resources.rdma is not supported by vz-runtime", hint="drop it from config.json"
        )
    v2 = group.version == 2
    available = set((read(group.dirs[""] + "/cgroup.controllers") or "").split()) if v2 else set()

    def need(controller: str) -> str:
        d = group.dir(controller)
        if d is None or (v2 and controller not in available):
            raise _missing(group.version, controller, _FIELD[controller])
        return d

    mem = resources.get("memory") or {}
    (_v2_memory if v2 else _v1_memory)(need, mem, warn)
    cpu = resources.get("cpu") or {}
    (_v2_cpu if v2 else _v1_cpu)(need, cpu)
    for key in ("cpus", "mems"):
        if cpu.get(key):
            write(need("cpuset") + "/cpuset." + key, str(cpu[key]), f"cpu.{key}")
    limit = _int(resources.get("pids") or {}, "limit", "pids")
    if limit:
        write(need("pids") + "/pids.max", "max" if limit < 0 else str(limit), "pids.limit")
    block = resources.get("blockIO") or {}
    if block:
        (_v2_io if v2 else _v1_blkio)(need, block)
    _hugetlb(need, resources.get("hugepageLimits") or [], v2)
    _network(need, resources.get("network") or {}, v2)
    unified = resources.get("unified") or {}
    if unified:
        _unified(group, unified)


# ---------------------------------------------------------------------------- memory


def _v1_memory(need: Callable[[str], str], mem: Json, warn: Warn) -> None:
    limit = _int(mem, "limit", "memory")
    swap = _int(mem, "swap", "memory")
    reservation = _int(mem, "reservation", "memory")
    swappiness = _int(mem, "swappiness", "memory")
    no_oom = mem.get("disableOOMKiller")
    if not (limit or swap or reservation or swappiness is not None or no_oom):
        return
    d = need("memory")
    memsw = d + "/memory.memsw.limit_in_bytes"
    if limit == -1 and not swap and os.path.exists(memsw):
        swap = -1  # unlimited memory: swap too (runc)
    if swap and not os.path.exists(memsw):
        raise HostUnsupported(
            "cannot set linux.resources.memory.swap: the kernel has no swap accounting "
            "(memory.memsw.* is missing)",
            hint="boot with swapaccount=1, or drop memory.swap",
        )
    steps = []
    if limit:
        steps.append(("memory.limit_in_bytes", limit, "memory.limit"))
    if swap:
        step = ("memory.memsw.limit_in_bytes", swap, "memory.swap")
        current = read(d + "/memory.limit_in_bytes")
        # The kernel wants memsw >= memory at every moment: raise the larger one first.
        grow = swap == -1 or (current is not None and int(current) < swap)
        if grow:
            steps.insert(0, step)
        else:
            steps.append(step)
    if reservation:
        steps.append(("memory.soft_limit_in_bytes", reservation, "memory.reservation"))
    if swappiness is not None:
        if not 0 <= swappiness <= 100:
            raise InvalidConfig(f"memory.swappiness {swappiness} is not in 0..100")
        steps.append(("memory.swappiness", swappiness, "memory.swappiness"))
    if no_oom:
        steps.append(("memory.oom_control", 1, "memory.disableOOMKiller"))
    if mem.get("kernel") is not None or mem.get("kernelTCP") is not None:
        warn("linux.resources.memory.kernel and kernelTCP are ignored (deprecated by the kernel)")
    for name, value, what in steps:
        write(f"{d}/{name}", str(value), what)


def _v2_memory(need: Callable[[str], str], mem: Json, warn: Warn) -> None:
    limit = _int(mem, "limit", "memory")
    swap = _int(mem, "swap", "memory")
    reservation = _int(mem, "reservation", "memory")
    if mem.get("swappiness") is not None:
        warn("linux.resources.memory.swappiness is ignored: cgroup v2 has no such setting")
    if mem.get("disableOOMKiller"):
        warn("linux.resources.memory.disableOOMKiller is ignored: cgroup v2 cannot do it")
    if not (limit or swap or reservation):
        return
    d = need("memory")
    if swap:
        swap_max = _v2_swap(swap, limit)
        if not os.path.exists(d + "/memory.swap.max"):
            raise HostUnsupported(
                "cannot set linux.resources.memory.swap: the kernel has no swap accounting "
                "(memory.swap.max is missing)",
                hint="drop memory.swap",
            )
        write(d + "/memory.swap.max", swap_max, "memory.swap")
    if limit:
        write(d + "/memory.max", "max" if limit < 0 else str(limit), "memory.limit")
    if reservation:
        low = "max" if reservation < 0 else str(reservation)
        write(d + "/memory.low", low, "memory.reservation")


def _v2_swap(swap: int, limit: int | None) -> str:
    """OCI memory+swap to v2's swap alone."""
    if swap < 0:
        return "max"
    if not limit or limit < 0:
        raise InvalidConfig(
            "memory.swap needs memory.limit on cgroup v2", hint="set memory.limit as well"
        )
    if swap < limit:
        raise InvalidConfig(
            f"memory.swap ({swap}) must be >= memory.limit ({limit})",
            hint="memory.swap counts memory plus swap",
        )
    return str(swap - limit)


# ---------------------------------------------------------------------------- cpu


def _v1_cpu(need: Callable[[str], str], cpu: Json) -> None:
    shares = _int(cpu, "shares", "cpu")
    quota = _int(cpu, "quota", "cpu")
    period = _int(cpu, "period", "cpu")
    rt_period = _int(cpu, "realtimePeriod", "cpu")
    rt_runtime = _int(cpu, "realtimeRuntime", "cpu")
    if not (shares or quota or period or rt_period or rt_runtime):
        return
    d = need("cpu")
    if shares:
        write(d + "/cpu.shares", str(shares), "cpu.shares")
    steps = []
    if period:
        steps.append(("cpu.cfs_period_us", period, "cpu.period"))
    if quota:
        steps.append(("cpu.cfs_quota_us", quota, "cpu.quota"))
    try:
        for name, value, what in steps:
            write(f"{d}/{name}", str(value), what)
    except Exception:
        # A shorter period can be refused until the quota fits it: the other order.
        for name, value, what in reversed(steps):
            write(f"{d}/{name}", str(value), what)
    if rt_period:
        write(d + "/cpu.rt_period_us", str(rt_period), "cpu.realtimePeriod")
    if rt_runtime:
        write(d + "/cpu.rt_runtime_us", str(rt_runtime), "cpu.realtimeRuntime")


def shares_to_weight(shares: int) -> int:
    """v1 cpu.shares -> v2 cpu.weight, 1024 -> 100 (rounded up: shares read back >= asked)."""
    return max(1, min(10000, -(-shares * 100 // 1024)))


def _v2_cpu(need: Callable[[str], str], cpu: Json) -> None:
    shares = _int(cpu, "shares", "cpu")
    quota = _int(cpu, "quota", "cpu")
    period = _int(cpu, "period", "cpu")
    idle = _int(cpu, "idle", "cpu")
    if cpu.get("realtimePeriod") or cpu.get("realtimeRuntime"):
        raise HostUnsupported(
            "cannot set cpu.realtimePeriod/realtimeRuntime: cgroup v2 has no realtime "
            "CPU controller",
            hint="drop them from linux.resources.cpu",
        )
    if not (shares or quota or period or idle is not None):
        return
    d = need("cpu")
    if shares:
        write(d + "/cpu.weight", str(shares_to_weight(shares)), "cpu.shares")
    if quota or period:
        value = str(quota) if quota and quota > 0 else "max"
        write(d + "/cpu.max", f"{value} {period}" if period else value, "cpu.quota/period")
    if idle is not None:
        write(d + "/cpu.idle", str(idle), "cpu.idle")


# ---------------------------------------------------------------------------- block I/O


def _device_lines(entries: list[Json], field: str, value_key: str) -> list[str]:
    out = []
    for e in entries:
        major, minor, value = _int(e, "major", field), _int(e, "minor", field), e.get(value_key)
        if major is None or minor is None or not isinstance(value, int):
            raise InvalidConfig(f"linux.resources.blockIO.{field} entries need major, minor and "
                                f"{value_key}")  # fmt: skip
        out.append(f"{major}:{minor} {value}")
    return out


def _v1_blkio(need: Callable[[str], str], block: Json) -> None:
    d = need("blkio")
    weight = _int(block, "weight", "blockIO")
    devices = block.get("weightDevice") or []
    if weight or devices:
        # CFQ offered blkio.weight; BFQ (the only proportional scheduler since 5.0) offers
        # blkio.bfq.weight, on non-root cgroups only.
        prefix = next((p for p in ("blkio.", "blkio.bfq.") if os.path.exists(f"{d}/{p}weight")), "")
        if not prefix:
            raise HostUnsupported(
                "cannot set linux.resources.blockIO.weight: the blkio controller offers no "
                "weight here (no CFQ or BFQ I/O scheduler)",
                hint="select bfq in /sys/block/DEV/queue/scheduler, or drop blockIO.weight",
            )
        if weight:
            write(f"{d}/{prefix}weight", str(weight), "blockIO.weight")
        for line in _device_lines(devices, "weightDevice", "weight"):
            write(f"{d}/{prefix}weight_device", line, "blockIO.weightDevice")
    leaf = _int(block, "leafWeight", "blockIO")
    if leaf:
        if not os.path.exists(d + "/blkio.leaf_weight"):
            raise HostUnsupported("cannot set blockIO.leafWeight: blkio.leaf_weight is missing "
                                  "(CFQ only)", hint="drop blockIO.leafWeight")  # fmt: skip
        write(d + "/blkio.leaf_weight", str(leaf), "blockIO.leafWeight")
    for key, name, _ in _THROTTLE:
        for line in _device_lines(block.get(key) or [], key, "rate"):
            write(f"{d}/blkio.throttle.{name}", line, f"blockIO.{key}")


def _v2_io(need: Callable[[str], str], block: Json) -> None:
    d = need("io")
    weight = _int(block, "weight", "blockIO")
    if weight:
        if os.path.exists(d + "/io.bfq.weight"):
            write(d + "/io.bfq.weight", str(weight), "blockIO.weight")
        elif os.path.exists(d + "/io.weight"):
            # v1 blkio 10..1000 -> v2 io.weight 1..10000.
            write(d + "/io.weight", f"default {1 + (weight - 10) * 9999 // 990}", "blockIO.weight")
        else:
            raise HostUnsupported(
                "cannot set linux.resources.blockIO.weight: no io.weight or io.bfq.weight "
                "(no I/O scheduler with weights)",
                hint="drop blockIO.weight",
            )
    for key, _, v2_key in _THROTTLE:
        for line in _device_lines(block.get(key) or [], key, "rate"):
            dev, _, rate = line.partition(" ")
            write(d + "/io.max", f"{dev} {v2_key}={rate}", f"blockIO.{key}")


# ---------------------------------------------------------------------------- the rest


def _hugetlb(need: Callable[[str], str], limits: list[Json], v2: bool) -> None:
    if not limits:
        return
    d = need("hugetlb")
    for entry in limits:
        size, limit = entry.get("pageSize"), entry.get("limit")
        if not isinstance(size, str) or not isinstance(limit, int):
            raise InvalidConfig("linux.resources.hugepageLimits entries need pageSize and limit")
        name = f"hugetlb.{size}.{'max' if v2 else 'limit_in_bytes'}"
        if not os.path.exists(f"{d}/{name}"):
            raise HostUnsupported(f"hugetlb page size {size!r} is not supported by this host",
                                  hint=f"see {d} for the sizes it has")  # fmt: skip
        write(f"{d}/{name}", str(limit), "hugepageLimits")


def _network(need: Callable[[str], str], network: Json, v2: bool) -> None:
    class_id = network.get("classID")
    priorities = network.get("priorities") or []
    if class_id is None and not priorities:
        return
    if v2:
        raise HostUnsupported(
            "cannot set linux.resources.network: cgroup v2 has no net_cls or net_prio controller",
            hint="drop linux.resources.network (match on the cgroup path in nftables instead)",
        )
    if class_id is not None:
        write(need("net_cls") + "/net_cls.classid", str(int(class_id)), "network.classID")
    for p in priorities:
        line = f"{p.get('name')} {int(p.get('priority', 0))}"
        write(need("net_prio") + "/net_prio.ifpriomap", line, "network.priorities")


def _unified(group: Cgroup, unified: Json) -> None:
    if group.version != 2:
        raise HostUnsupported(
            "linux.resources.unified needs cgroup v2; this host uses v1",
            hint="use the v1 fields of linux.resources instead",
        )
    for key, value in unified.items():
        if "/" in key or key.startswith("."):
            raise InvalidConfig(f"linux.resources.unified key {key!r} must be a file name")
        write(group.dirs[""] + "/" + key, str(value), f"unified {key}")
