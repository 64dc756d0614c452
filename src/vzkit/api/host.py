"""What vzd found out about its host (GET /1.0/host)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from vzkit.api.base import Strict
from vzkit.api.instances import Accel
from vzkit.host.kvm import KvmStatus

__all__ = ["HostInfo", "TscInfo"]


class TscInfo(Strict):
    khz: int | None = Field(description="Host TSC frequency in kHz (for tsc_early_khz=)")
    source: str = Field(description="Where khz came from: sysfs, kvm, cpuinfo-mhz, ...")
    flags: list[str] = Field(default_factory=list, description="TSC-related CPU flags")


class HostInfo(Strict):
    cpus: int = Field(description="Online CPUs (os.cpu_count)")
    cpu_affinity: list[int] = Field(description="CPUs this process may run on")
    memory_total: int = Field(description="Bytes of RAM (MemTotal)")
    memory_available: int = Field(description="Bytes available now (MemAvailable), read live")
    qemu_binary: str
    qemu_version: str
    kvm: KvmStatus
    accel: Accel
    accel_reason: str
    tsc_khz: int | None
    tsc_source: str
    tsc_flags: list[str]
    cgroup_version: Literal[1, 2]
    kernel_release: str
    boot_id: str
    probed_at: datetime
    probe_ms: float = Field(description="Time this call took (a cache hit is a few ms)")
    from_cache: bool = False

    @property
    def constant_tsc(self) -> bool:
        return "constant_tsc" in self.tsc_flags
