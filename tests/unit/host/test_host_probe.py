"""Host probe: TSC sources, meminfo, accelerator choice and the per-boot cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzkit.api.instances import Accel
from vzkit.errors import HostUnsupported, InvalidConfig
from vzkit.host import probe
from vzkit.host.kvm import KvmStatus
from vzkit.host.probe import parse_meminfo, parse_tsc, probe_host
from vzkit.settings import Settings

# This VM: no aperfmperf, no cpufreq; 'cpu MHz' is the calibrated rate.
CPUINFO_VM = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2599.998
flags\t\t: fpu tsc msr rdtscp lm constant_tsc nonstop_tsc tsc_known_freq hypervisor
bogomips\t: 5199.99

processor\t: 1
cpu MHz\t\t: 1234.000
"""

# Bare metal: 'cpu MHz' is the live (turbo) frequency, useless for the TSC.
CPUINFO_METAL_INTEL = """\
processor\t: 0
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
cpu MHz\t\t: 4300.112
flags\t\t: fpu tsc constant_tsc nonstop_tsc aperfmperf tsc_deadline_timer
bogomips\t: 6399.96
"""

CPUINFO_AMD_NO_BOGOMIPS = """\
processor\t: 0
model name\t: AMD Ryzen 7 5800X 8-Core Processor
cpu MHz\t\t: 2200.000
flags\t\t: fpu tsc constant_tsc nonstop_tsc aperfmperf
"""

CPUINFO_MODEL_ONLY = """\
processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz
flags\t\t: fpu tsc constant_tsc aperfmperf
"""

CPUINFO_ARM = """\
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm
"""


def test_tsc_from_cpu_mhz_when_not_live() -> None:
    tsc = parse_tsc(CPUINFO_VM)
    assert (tsc.khz, tsc.source) == (2599998, "cpuinfo-mhz")
    assert "constant_tsc" in tsc.flags and "tsc_known_freq" in tsc.flags
    assert "hypervisor" not in tsc.flags


def test_tsc_bogomips_when_mhz_is_live() -> None:
    tsc = parse_tsc(CPUINFO_METAL_INTEL)
    assert (tsc.khz, tsc.source) == (3199980, "bogomips")


def test_tsc_cpufreq_makes_mhz_untrusted() -> None:
    tsc = parse_tsc(CPUINFO_VM, cpufreq=True)
    assert (tsc.khz, tsc.source) == (2599995, "bogomips")


def test_tsc_mhz_disagreeing_with_bogomips() -> None:
    text = CPUINFO_VM.replace("2599.998", "1800.000", 1)
    assert parse_tsc(text).source == "bogomips"


def test_tsc_model_name_last() -> None:
    tsc = parse_tsc(CPUINFO_MODEL_ONLY)
    assert (tsc.khz, tsc.source) == (2400000, "model-name")


def test_tsc_nothing_usable() -> None:
    assert parse_tsc(CPUINFO_AMD_NO_BOGOMIPS).khz is None
    arm = parse_tsc(CPUINFO_ARM)
    assert (arm.khz, arm.source, arm.flags) == (None, "none", [])


def test_tsc_source_priority() -> None:
    assert parse_tsc(CPUINFO_VM, sysfs_khz=2600000, kvm_khz=1).source == "sysfs"
    tsc = parse_tsc(CPUINFO_METAL_INTEL, kvm_khz=3192000)
    assert (tsc.khz, tsc.source) == (3192000, "kvm")


def test_meminfo() -> None:
    mem = parse_meminfo("MemTotal:       24683656 kB\nMemAvailable:   100 kB\nHugePages_Total: 0\n")
    assert mem == {"MemTotal": 24683656 * 1024, "MemAvailable": 102400, "HugePages_Total": 0}


# ---------------------------------------------------------------------------- probe_host


UNUSABLE = KvmStatus(usable=False, module="kvm_pvm", reason="slow: using TCG", ring0_mips=3.0)
USABLE = KvmStatus(usable=True, module="kvm_intel", reason="fast", ring0_mips=900.0)


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 9.1.2 (Debian 1:9.1.2+ds-1)'\n")
    qemu.chmod(0o755)
    return qemu


@pytest.fixture
def kvm_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake() -> KvmStatus:
        calls.append(1)
        return UNUSABLE

    monkeypatch.setattr(probe, "probe_kvm", fake)
    return calls


def settings(tmp_path: Path, qemu: Path, accel: str | None = None) -> Settings:
    return Settings(runtime_dir=tmp_path / "run", qemu_binary=str(qemu), accel=accel)


def test_probe_host_and_cache(tmp_path: Path, fake_qemu: Path, kvm_calls: list[int]) -> None:
    s = settings(tmp_path, fake_qemu)
    first = probe_host(s)
    assert first.qemu_version == "9.1.2"
    assert first.accel is Accel.TCG
    assert first.accel_reason == "slow: using TCG"
    assert not first.from_cache
    assert first.cpus >= 1 and first.cpu_affinity
    assert first.memory_total >= first.memory_available > 0
    assert (tmp_path / "run" / probe.CACHE_FILE).exists()

    second = probe_host(s)
    assert second.from_cache
    assert kvm_calls == [1]
    assert second.kvm == first.kvm

    probe_host(s, refresh=True)
    assert kvm_calls == [1, 1]


def test_cache_invalidated_by_new_qemu(
    tmp_path: Path, fake_qemu: Path, kvm_calls: list[int]
) -> None:
    s = settings(tmp_path, fake_qemu)
    probe_host(s)
    st = fake_qemu.stat()
    os.utime(fake_qemu, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not probe_host(s).from_cache
    assert len(kvm_calls) == 2


def test_accel_override_not_cached(tmp_path: Path, fake_qemu: Path, kvm_calls: list[int]) -> None:
    probe_host(settings(tmp_path, fake_qemu))
    forced = probe_host(settings(tmp_path, fake_qemu, accel="kvm"))
    assert forced.from_cache
    assert forced.accel is Accel.KVM
    assert "forced" in forced.accel_reason and "not usable" in forced.accel_reason
    again = probe_host(settings(tmp_path, fake_qemu))
    assert again.accel is Accel.TCG


def test_accel_choice() -> None:
    assert probe._choose_accel(USABLE, None) == (Accel.KVM, "fast")
    accel, reason = probe._choose_accel(USABLE, "tcg")
    assert accel is Accel.TCG and "forced" in reason
    with pytest.raises(InvalidConfig) as exc:
        probe._choose_accel(USABLE, "hvf")
    assert exc.value.hint


def test_missing_qemu(tmp_path: Path) -> None:
    with pytest.raises(HostUnsupported) as exc:
        probe_host(settings(tmp_path, tmp_path / "no-such-qemu"))
    assert exc.value.hint == "apt-get install qemu-system-x86 (scripts/setup does this)"


def test_broken_qemu(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\necho 'libfoo.so: not found' >&2\nexit 127\n")
    qemu.chmod(0o755)
    with pytest.raises(HostUnsupported, match="libfoo"):
        probe_host(settings(tmp_path, qemu))


def test_corrupt_cache_is_ignored(tmp_path: Path, fake_qemu: Path, kvm_calls: list[int]) -> None:
    s = settings(tmp_path, fake_qemu)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / probe.CACHE_FILE).write_text("{not json")
    assert not probe_host(s).from_cache
    assert probe_host(s).from_cache
