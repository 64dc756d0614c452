"""The host probe and cgroups on the real host (needs root for the cgroup tests)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.api.instances import Accel
from vzkit.host.cgroups import DEFAULT_ROOT, Cgroup, CgroupLimits, detect, detect_version
from vzkit.host.kvm import MIN_RING0_MIPS, measure_ring0
from vzkit.host.probe import probe_host
from vzkit.settings import Settings

pytestmark = pytest.mark.integration

MiB = 1024**2
PVM = Path("/sys/module/kvm_pvm").is_dir()


def test_probe_host_cold_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # How long each takes, against the `qemu --version` it runs: benchmarks/latencies.py.
    settings = Settings(runtime_dir=tmp_path, accel=None)
    cold = probe_host(settings)
    assert not cold.from_cache
    assert cold.qemu_version
    assert cold.cpus == os.cpu_count()
    assert cold.tsc_khz is None or 100_000 < cold.tsc_khz < 10_000_000
    if PVM:
        assert not cold.kvm.usable
        assert cold.kvm.module is not None and "kvm_pvm" in cold.kvm.module
        assert cold.accel is Accel.TCG
        assert "MIPS" in cold.accel_reason and "TCG" in cold.accel_reason

    # Served from the cache: no process is started and /dev/kvm is not touched.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the cached probe did real work: {args}")

    real_open = os.open

    def no_kvm(path: object, *args: int, **kwargs: object) -> int:
        if "kvm" in str(path):
            refuse(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", refuse)
        m.setattr(subprocess, "Popen", refuse)
        m.setattr(os, "open", no_kvm)
        cached = probe_host(settings)
    assert cached.from_cache
    assert cached.kvm == cold.kvm
    assert cached.model_dump(exclude={"from_cache", "probe_ms", "memory_available"}) == (
        cold.model_dump(exclude={"from_cache", "probe_ms", "memory_available"})
    )


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm access")
def test_ring0_measurement() -> None:
    # Each guest run is bounded by the probe's own timer (how long it takes in all:
    # benchmarks/latencies.py).
    result = measure_ring0()
    assert result.error is None, result.error
    assert result.mips is not None
    if PVM:
        assert result.mips < MIN_RING0_MIPS


@pytest.fixture
def test_group_root() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("cgroups need root")
    name = f"vzkit-test-{os.getpid()}"
    yield name
    drv = detect()
    group = drv.open(name)
    if group is not None:
        group.kill(timeout=1)
        group.destroy()


def _spawn_in(group: Cgroup, argv: list[str]) -> subprocess.Popen[bytes]:
    # The engine's way: the shell joins every hierarchy, then execs the payload.
    files = " ".join(str(f) for f in group.procs_files())
    script = f'for f in {files}; do echo $$ > "$f" || exit 99; done; exec "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", *argv])


def _wait_for_pid(group: Cgroup, pid: int) -> None:
    # In every hierarchy: the shell joins them one after the other (v1).
    deadline = time.monotonic() + 5
    while not all(str(pid) in f.read_text().split() for f in group.procs_files()):
        assert time.monotonic() < deadline, "process never appeared in the cgroup"
        time.sleep(0.01)


def test_real_cgroup_lifecycle(test_group_root: str) -> None:
    drv = detect()
    limits = CgroupLimits(
        memory_max=64 * MiB, cpu_weight=50, cpu_quota=0.5, cpuset_cpus=[0], pids_max=16
    )
    group = drv.create(f"{test_group_root}/inst", limits)
    proc = _spawn_in(group, ["sleep", "30"])
    try:
        _wait_for_pid(group, proc.pid)
        if drv.version == 1:
            mem = DEFAULT_ROOT / "memory" / test_group_root / "inst"
            assert (mem / "memory.limit_in_bytes").read_text().strip() == str(64 * MiB)
            cpu = DEFAULT_ROOT / "cpu" / test_group_root / "inst"
            assert (cpu / "cpu.shares").read_text().strip() == "512"
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        else:
            leaf = DEFAULT_ROOT / test_group_root / "inst"
            assert (leaf / "memory.max").read_text().strip() == str(64 * MiB)
            assert (leaf / "cpu.max").read_text().strip() == "50000 100000"
        stats = group.stats()
        assert stats.pids_current >= 1
        assert stats.memory_current > 0
        assert stats.oom_kills == 0

        group.update(limits.replace(memory_max=128 * MiB))
        group.kill()
        assert proc.wait(timeout=5) == -9
        assert group.pids() == []
        group.destroy()
        assert not group.exists()
        assert drv.open(f"{test_group_root}/inst") is None
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(detect_version() != 1, reason="cgroup v1 host only")
def test_real_v1_cpuset_accepts_tasks(test_group_root: str) -> None:
    # Without cpuset.mems/cpus copied from the parent, v1 refuses tasks with ENOSPC.
    group = detect().create(f"{test_group_root}/cs", CgroupLimits())
    proc = _spawn_in(group, ["sleep", "5"])
    try:
        _wait_for_pid(group, proc.pid)
    finally:
        proc.kill()
        proc.wait()
    group.destroy()


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm access")
def test_probe_kvm_outside_main_thread() -> None:
    # No SIGALRM handler can be installed here, so the test runs in a child process.
    from concurrent.futures import ThreadPoolExecutor

    from vzkit.host.kvm import probe_kvm

    with ThreadPoolExecutor(1) as pool:
        status = pool.submit(probe_kvm).result(timeout=5)
    assert status.ring0_mips is not None, status.reason
    if PVM:
        assert not status.usable
