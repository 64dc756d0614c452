"""Admission rules for CPU, memory and pinning, and the QEMU cgroup memory limit."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vzkit.api.host import HostInfo
from vzkit.api.instances import Accel, Limits
from vzkit.errors import ResourceExhausted
from vzkit.host.kvm import KvmStatus
from vzkit.host.resources import OvercommitPolicy, check_fit, human_size, qemu_memory_limit

MiB = 1024**2
GiB = 1024**3


def host(cpus: int = 2, memory: int = 24 * GiB, affinity: list[int] | None = None) -> HostInfo:
    return HostInfo(
        cpus=cpus,
        cpu_affinity=affinity if affinity is not None else list(range(cpus)),
        memory_total=memory,
        memory_available=memory,
        qemu_binary="/usr/bin/qemu-system-x86_64",
        qemu_version="7.2.22",
        kvm=KvmStatus(usable=False, module=None, reason="no kvm"),
        accel=Accel.TCG,
        accel_reason="no kvm",
        tsc_khz=2600000,
        tsc_source="kvm",
        tsc_flags=["tsc", "constant_tsc"],
        cgroup_version=1,
        kernel_release="6.1.0",
        boot_id="b",
        probed_at=datetime.now(UTC),
        probe_ms=1.0,
    )


def lim(cpus: int = 1, memory: int = 256 * MiB, pin: list[int] | None = None) -> Limits:
    return Limits(cpus=cpus, memory=memory, cpu_pin=pin)


def test_fits() -> None:
    check_fit(lim(), [lim(), lim()], host(), OvercommitPolicy())
    check_fit(lim(2, 8 * GiB), [], host())


def test_more_vcpus_than_host_cpus() -> None:
    with pytest.raises(ResourceExhausted) as exc:
        check_fit(lim(cpus=3), [], host(cpus=2))
    assert exc.value.message == "cannot give an instance 3 vCPUs: the host has 2 CPUs"
    assert exc.value.hint == "use --cpus 2 or fewer"


def test_cpu_overcommit() -> None:
    allocated = [lim(cpus=2)] * 3 + [lim(cpus=1)]  # 7 vCPUs, budget 2 * 4.0 = 8
    check_fit(lim(cpus=1), allocated, host())
    with pytest.raises(ResourceExhausted) as exc:
        check_fit(lim(cpus=2), allocated, host())
    assert exc.value.message == (
        "cannot allocate 2 vCPUs: the host has 2 CPUs, 7 vCPUs already allocated to "
        "4 instances (overcommit ratio 4 allows 8)"
    )
    assert "VZ_CPU_OVERCOMMIT" in (exc.value.hint or "")
    check_fit(lim(cpus=2), allocated, host(), OvercommitPolicy(cpu_overcommit=5))


def test_single_instance_larger_than_host() -> None:
    with pytest.raises(ResourceExhausted) as exc:
        check_fit(lim(memory=64 * GiB), [], host(memory=24 * GiB))
    assert exc.value.message.startswith("cannot allocate 64GiB of memory: the host has 24GiB")
    assert exc.value.hint == "use --memory 23.5GiB or less"


def test_memory_total_with_overcommit() -> None:
    h = host(memory=4 * GiB)  # 3.5GiB usable after the 512MiB reserve
    allocated = [lim(memory=512 * MiB), lim(memory=512 * MiB)]
    with pytest.raises(ResourceExhausted) as exc:
        check_fit(lim(memory=3 * GiB), allocated, h)
    assert exc.value.message == (
        "cannot allocate 3GiB of memory: the host has 3.5GiB for instances, "
        "1GiB already allocated to 2 instances (overcommit ratio 1)"
    )
    assert exc.value.hint == (
        "use --memory with a smaller size, stop other instances, "
        "or raise VZ_MEMORY_OVERCOMMIT in vzd's environment"
    )
    check_fit(lim(memory=3 * GiB), allocated, h, OvercommitPolicy(memory_overcommit=1.5))


def test_cpu_pin_must_exist() -> None:
    check_fit(lim(pin=[1]), [], host())
    with pytest.raises(ResourceExhausted) as exc:
        check_fit(lim(pin=[1, 5, 6]), [], host())
    assert exc.value.message == "cannot pin to CPUs 5-6: the host's usable CPUs are 0-1"
    with pytest.raises(ResourceExhausted, match="CPU 0:"):
        check_fit(lim(pin=[0]), [], host(affinity=[1]))


def test_qemu_memory_limit() -> None:
    small = qemu_memory_limit(256 * MiB)
    big = qemu_memory_limit(GiB)
    assert small % MiB == 0 and big % MiB == 0
    # Guest RAM, a 64 MiB translation cache and QEMU itself (measured 56 MiB) must fit.
    assert small >= 256 * MiB + 64 * MiB + 56 * MiB
    assert big - GiB > small - 256 * MiB
    assert qemu_memory_limit(GiB, cpus=4) > big
    assert qemu_memory_limit(GiB, tb_size_mib=0) == big - 64 * MiB


def test_human_size() -> None:
    assert human_size(24 * GiB) == "24GiB"
    assert human_size(25276063744) == "23.5GiB"
    assert human_size(512 * MiB) == "512MiB"
    assert human_size(10) == "10B"


@pytest.mark.parametrize("limits", [{"cpu_pin": [0, -1]}, {"memory": 2**63}])
def test_limits_no_host_can_meet_rejected(limits: dict[str, object]) -> None:
    # Accepted before, and only refused (a 507, like a real shortage) when the instance started.
    with pytest.raises(ValueError):
        Limits.model_validate(limits)
