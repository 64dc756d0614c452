"""What this host offers: CPUs, memory, QEMU, an accelerator, the TSC rate, cgroups.

The slow parts (the KVM test, ``qemu --version``) are cached per boot in
``runtime_dir/host-probe.json``, keyed on the boot id and the QEMU binary's path and mtime.
Two things are never cached: the available memory (read live) and the accelerator
override from the settings (applied on every call).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from vzkit.api.host import HostInfo, TscInfo
from vzkit.api.instances import Accel
from vzkit.errors import HostUnsupported, InvalidConfig
from vzkit.host.cgroups import detect_version
from vzkit.host.kvm import KvmStatus, probe_kvm
from vzkit.settings import Settings

__all__ = [
    "CACHE_FILE",
    "HostInfo",
    "TscInfo",
    "parse_meminfo",
    "parse_tsc",
    "probe_host",
]

log = logging.getLogger(__name__)

CACHE_FILE = "host-probe.json"
_CACHE_FORMAT = 1
_QEMU_HINT = "apt-get install qemu-system-x86 (scripts/setup does this)"

_PROC = Path("/proc")
_SYS_CPU0 = Path("/sys/devices/system/cpu/cpu0")
_CGROUP_ROOT = Path("/sys/fs/cgroup")

# 'cpu MHz' and bogomips/2 both derive from the kernel's TSC calibration when the former
# is not a live frequency reading; beyond this relative difference they disagree.
_TSC_AGREEMENT = 1e-3


# ---------------------------------------------------------------------------- parsers


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per key."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            factor = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
            out[key.strip()] = int(fields[0]) * factor
    return out


def _cpuinfo_first(text: str) -> dict[str, str]:
    """Fields of the first processor block."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def parse_tsc(
    cpuinfo: str,
    *,
    sysfs_khz: int | None = None,
    kvm_khz: int | None = None,
    cpufreq: bool = False,
) -> TscInfo:
    """Find the host TSC rate, most exact source first.

    1. ``tsc_freq_khz`` in sysfs (some kernels export the calibrated value);
    2. KVM_GET_TSC_KHZ: a vCPU's default TSC rate is the kernel's tsc_khz;
    3. 'cpu MHz' in /proc/cpuinfo: cpu_khz printed to 1 kHz, but only when it is not a
       live frequency (no APERF/MPERF, no cpufreq driver) and agrees with bogomips;
    4. bogomips / 2: on x86 the delay loop is calibrated from tsc_khz (5 kHz steps);
    5. the '@ 2.60GHz' of Intel model names, the nominal rate (constant_tsc runs at it).
    """
    info = _cpuinfo_first(cpuinfo)
    flags_all = info.get("flags", "").split()
    flags = [f for f in flags_all if "tsc" in f]
    if sysfs_khz:
        return TscInfo(khz=sysfs_khz, source="sysfs", flags=flags)
    if kvm_khz:
        return TscInfo(khz=kvm_khz, source="kvm", flags=flags)
    if "tsc" not in flags_all:
        return TscInfo(khz=None, source="none", flags=flags)

    bogo_khz: int | None = None
    with contextlib.suppress(KeyError, ValueError):
        bogo_khz = round(float(info["bogomips"]) * 500)
    mhz_khz: int | None = None
    if not cpufreq and "aperfmperf" not in flags_all:
        with contextlib.suppress(KeyError, ValueError):
            mhz_khz = round(float(info["cpu MHz"]) * 1000)
    if mhz_khz and (bogo_khz is None or abs(mhz_khz - bogo_khz) <= _TSC_AGREEMENT * bogo_khz):
        return TscInfo(khz=mhz_khz, source="cpuinfo-mhz", flags=flags)
    if bogo_khz:
        return TscInfo(khz=bogo_khz, source="bogomips", flags=flags)
    m = re.search(r"@\s*(\d+(?:\.\d+)?)\s*GHz", info.get("model name", ""))
    if m:
        return TscInfo(khz=round(float(m.group(1)) * 1e6), source="model-name", flags=flags)
    return TscInfo(khz=None, source="none", flags=flags)


def _qemu_version(output: str) -> str:
    m = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", output)
    return m.group(1) if m else output.strip().splitlines()[0] if output.strip() else "unknown"


# ---------------------------------------------------------------------------- readers


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _read_int(path: Path) -> int | None:
    try:
        return int(_read(path).strip())
    except (OSError, ValueError):
        return None


def _boot_id() -> str:
    try:
        return _read(_PROC / "sys/kernel/random/boot_id").strip()
    except OSError:
        return "unknown"


def _find_qemu(binary: str) -> Path:
    found = shutil.which(binary)
    if found is None:
        raise HostUnsupported(f"QEMU binary {binary!r} not found", hint=_QEMU_HINT)
    return Path(found).resolve()


def _run_qemu_version(qemu: Path) -> str:
    try:
        proc = subprocess.run(
            [str(qemu), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostUnsupported(f"cannot run {qemu} --version: {exc}", hint=_QEMU_HINT) from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostUnsupported(
            f"{qemu} --version exited with status {proc.returncode}: {tail}", hint=_QEMU_HINT
        )
    return _qemu_version(proc.stdout)


def _memory() -> tuple[int, int]:
    mem = parse_meminfo(_read(_PROC / "meminfo"))
    total = mem.get("MemTotal", 0)
    return total, mem.get("MemAvailable", mem.get("MemFree", 0))


# ---------------------------------------------------------------------------- accel


def _choose_accel(kvm: KvmStatus, forced: str | None) -> tuple[Accel, str]:
    if forced is None:
        if kvm.usable:
            return Accel.KVM, kvm.reason
        return Accel.TCG, kvm.reason
    try:
        accel = Accel(forced.lower())
    except ValueError:
        raise InvalidConfig(
            f"unknown accelerator {forced!r} in the settings (VZ_ACCEL)",
            hint="use 'kvm' or 'tcg', or leave VZ_ACCEL unset to probe",
        ) from None
    if accel is Accel.KVM and not kvm.usable:
        return accel, f"forced to kvm by the settings although it is not usable: {kvm.reason}"
    return accel, f"forced to {accel.value} by the settings ({kvm.reason})"


# ---------------------------------------------------------------------------- cache


def _cache_key(boot_id: str, qemu: Path) -> dict[str, str | int]:
    try:
        mtime = qemu.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return {"format": _CACHE_FORMAT, "boot_id": boot_id, "qemu": str(qemu), "mtime_ns": mtime}


def _load_cache(path: Path, key: dict[str, str | int]) -> HostInfo | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.debug("ignoring unreadable host probe cache %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    try:
        return HostInfo.model_validate(data.get("host"))
    except ValidationError as exc:
        log.debug("ignoring stale host probe cache %s: %s", path, exc)
        return None


def _store_cache(path: Path, key: dict[str, str | int], info: HostInfo) -> None:
    # The cache only saves time; a read-only or missing runtime dir must not fail a probe.
    body = {"key": key, "host": info.model_dump(mode="json")}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write host probe cache %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- probe


def _probe_uncached(qemu: Path, boot_id: str) -> HostInfo:
    version = _run_qemu_version(qemu)
    kvm = probe_kvm()
    accel, reason = _choose_accel(kvm, None)
    try:
        cpuinfo = _read(_PROC / "cpuinfo")
    except OSError:
        cpuinfo = ""
    tsc = parse_tsc(
        cpuinfo,
        sysfs_khz=_read_int(_SYS_CPU0 / "tsc_freq_khz"),
        kvm_khz=kvm.tsc_khz,
        cpufreq=(_SYS_CPU0 / "cpufreq").exists(),
    )
    total, available = _memory()
    return HostInfo(
        cpus=os.cpu_count() or 1,
        cpu_affinity=sorted(os.sched_getaffinity(0)),
        memory_total=total,
        memory_available=available,
        qemu_binary=str(qemu),
        qemu_version=version,
        kvm=kvm,
        accel=accel,
        accel_reason=reason,
        tsc_khz=tsc.khz,
        tsc_source=tsc.source,
        tsc_flags=tsc.flags,
        cgroup_version=detect_version(_CGROUP_ROOT),
        kernel_release=os.uname().release,
        boot_id=boot_id,
        probed_at=datetime.now(UTC),
        probe_ms=0.0,
    )


def probe_host(settings: Settings, *, refresh: bool = False) -> HostInfo:
    """Describe this host; served from the per-boot cache unless ``refresh``.

    Raises HostUnsupported when QEMU is missing or broken, InvalidConfig for a bad
    accelerator override.
    """
    start = time.perf_counter()
    qemu = _find_qemu(settings.qemu_binary)
    boot_id = _boot_id()
    key = _cache_key(boot_id, qemu)
    cache_path = settings.runtime_dir / CACHE_FILE

    info = None if refresh else _load_cache(cache_path, key)
    from_cache = info is not None
    if info is None:
        info = _probe_uncached(qemu, boot_id).model_copy(
            update={"probe_ms": round((time.perf_counter() - start) * 1000, 2)}
        )
        _store_cache(cache_path, key, info)

    accel, reason = _choose_accel(info.kvm, settings.accel)
    _, available = _memory()
    return info.model_copy(
        update={
            "accel": accel,
            "accel_reason": reason,
            "memory_available": available,
            "from_cache": from_cache,
            "probe_ms": round((time.perf_counter() - start) * 1000, 2),
        }
    )
