"""CPU and memory accounting: does one more instance fit on this host?

Memory is accounted in guest RAM (what users ask for) against the host's total minus a
reserve, times the overcommit ratio. QEMU's own overhead is not charged here; it is bounded
per instance by the cgroup limit from ``qemu_memory_limit``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from vzkit.api.base import Strict
from vzkit.api.host import HostInfo
from vzkit.api.instances import Limits
from vzkit.errors import ResourceExhausted
from vzkit.host.cgroups import format_cpus

__all__ = [
    "QEMU_BASE_OVERHEAD",
    "TCG_TB_SIZE_MIB",
    "OvercommitPolicy",
    "check_fit",
    "human_size",
    "qemu_memory_limit",
]

MiB = 1024**2
GiB = 1024**3

# The size the engine should give TCG's translation cache: `-accel tcg,tb-size=64`.
# QEMU 7.2's default is 1 GiB, which a long-running guest fills (RSS grows with it).
TCG_TB_SIZE_MIB = 64
# Measured RSS of a TCG microvm beside guest RAM and the translation cache: 56 MiB for
# 256 MiB and for 1 GiB of guest RAM (QEMU 7.2, Debian cloud kernel, busybox initramfs).
QEMU_BASE_OVERHEAD = 80 * MiB
# Guest page tables in the host kernel and QEMU's per-page state grow with guest RAM.
_PER_GUEST_RAM = 1 / 64
_PER_VCPU = 8 * MiB


class OvercommitPolicy(Strict):
    cpu_overcommit: float = Field(
        4.0, gt=0, description="Total vCPUs may be this many times the host CPUs"
    )
    memory_overcommit: float = Field(
        1.0, gt=0, description="Total guest RAM may be this many times the usable host RAM"
    )
    memory_reserve: int = Field(
        512 * MiB, ge=0, description="Bytes of host RAM never given to instances"
    )


def human_size(n: int) -> str:
    """Bytes as a short size with one decimal: 23.4GiB, 512.0MiB."""
    for unit, factor in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


def _instances(n: int) -> str:
    return f"{n} instance{'s' if n != 1 else ''}"


def check_fit(
    request: Limits,
    allocated: Sequence[Limits],
    host: HostInfo,
    policy: OvercommitPolicy | None = None,
) -> None:
    """Raise ResourceExhausted unless ``request`` fits beside ``allocated`` on ``host``."""
    policy = policy or OvercommitPolicy()
    _check_cpus(request, allocated, host, policy)
    _check_memory(request, allocated, host, policy)
    _check_pin(request, host)


def _check_cpus(
    request: Limits, allocated: Sequence[Limits], host: HostInfo, policy: OvercommitPolicy
) -> None:
    if request.cpus > host.cpus:
        raise ResourceExhausted(
            f"cannot give an instance {request.cpus} vCPUs: the host has {host.cpus} CPUs",
            hint=f"use --cpus {host.cpus} or fewer",
            requested=request.cpus,
            host_cpus=host.cpus,
        )
    used = sum(a.cpus for a in allocated)
    budget = int(host.cpus * policy.cpu_overcommit)
    if used + request.cpus > budget:
        raise ResourceExhausted(
            f"cannot allocate {request.cpus} vCPUs: the host has {host.cpus} CPUs, "
            f"{used} vCPUs already allocated to {_instances(len(allocated))} "
            f"(overcommit ratio {policy.cpu_overcommit:g} allows {budget})",
            hint=(
                "use --cpus with fewer vCPUs, stop other instances, "
                "or raise VZ_CPU_OVERCOMMIT in vzd's environment"
            ),
            requested=request.cpus,
            allocated=used,
            budget=budget,
        )


def _check_memory(
    request: Limits, allocated: Sequence[Limits], host: HostInfo, policy: OvercommitPolicy
) -> None:
    usable = max(0, host.memory_total - policy.memory_reserve)
    hint = (
        "use --memory with a smaller size, stop other instances, "
        "or raise VZ_MEMORY_OVERCOMMIT in vzd's environment"
    )
    if request.memory > usable:
        raise ResourceExhausted(
            f"cannot allocate {human_size(request.memory)} of memory: the host has "
            f"{human_size(host.memory_total)} ({human_size(policy.memory_reserve)} reserved "
            "for the host), so no single instance can have more than "
            f"{human_size(usable)}",
            hint=f"use --memory {human_size(usable)} or less",
            requested=request.memory,
            usable=usable,
        )
    used = sum(a.memory for a in allocated)
    budget = int(usable * policy.memory_overcommit)
    if used + request.memory > budget:
        raise ResourceExhausted(
            f"cannot allocate {human_size(request.memory)} of memory: the host has "
            f"{human_size(usable)} for instances, {human_size(used)} already allocated to "
            f"{_instances(len(allocated))} (overcommit ratio {policy.memory_overcommit:g})",
            hint=hint,
            requested=request.memory,
            allocated=used,
            budget=budget,
        )


def _check_pin(request: Limits, host: HostInfo) -> None:
    if not request.cpu_pin:
        return
    usable = set(host.cpu_affinity)
    missing = sorted(set(request.cpu_pin) - usable)
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise ResourceExhausted(
            f"cannot pin to CPU{plural} {format_cpus(missing)}: "
            f"the host's usable CPUs are {format_cpus(usable)}",
            hint=f"use --cpu-pin with CPUs from {format_cpus(usable)}",
            missing=missing,
        )


def qemu_memory_limit(
    guest_memory: int, *, cpus: int = 1, tb_size_mib: int = TCG_TB_SIZE_MIB
) -> int:
    """Cgroup memory limit for a QEMU process running ``guest_memory`` bytes of guest RAM.

    Guest RAM fully touched, plus the TCG translation cache (pass ``tb_size_mib=0`` under
    KVM), QEMU's own footprint, per-vCPU state and guest page tables. The result is
    rounded up to a MiB.
    """
    total = (
        guest_memory
        + tb_size_mib * MiB
        + QEMU_BASE_OVERHEAD
        + cpus * _PER_VCPU
        + int(guest_memory * _PER_GUEST_RAM)
    )
    return -(-total // MiB) * MiB
