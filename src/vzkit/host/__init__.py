"""Host facts and bookkeeping: capability probe, cgroups, CPU/memory accounting."""

from vzkit.host.cgroups import (
    Cgroup,
    CgroupDriver,
    CgroupLimits,
    CgroupStats,
    CgroupV1,
    CgroupV2,
    detect,
    detect_version,
)
from vzkit.host.kvm import KvmStatus, probe_kvm
from vzkit.host.probe import HostInfo, probe_host
from vzkit.host.resources import OvercommitPolicy, check_fit, qemu_memory_limit

__all__ = [
    "Cgroup",
    "CgroupDriver",
    "CgroupLimits",
    "CgroupStats",
    "CgroupV1",
    "CgroupV2",
    "HostInfo",
    "KvmStatus",
    "OvercommitPolicy",
    "check_fit",
    "detect",
    "detect_version",
    "probe_host",
    "probe_kvm",
    "qemu_memory_limit",
]
