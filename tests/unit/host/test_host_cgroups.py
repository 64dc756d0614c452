"""Cgroup drivers against plain directories laid out like cgroupfs (v1 and v2)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from vzkit.errors import EngineError, HostUnsupported, InvalidConfig
from vzkit.host.cgroups import (
    CgroupLimits,
    CgroupV1,
    CgroupV2,
    V1Cgroup,
    V2Cgroup,
    detect,
    detect_version,
    format_cpus,
    io_weight_to_v1,
    quota_to_cfs,
    weight_to_shares,
)

MiB = 1024**2
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "freezer")


def make_v1(root: Path, *, memsw: bool = True) -> Path:
    for c in V1_CONTROLLERS:
        d = root / c
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("")
    (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    if memsw:
        (root / "memory" / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    # A hybrid host also has an empty cgroup2 tree here; it must not make this "v2".
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.controllers").write_text("")
    return root


def make_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


def read(p: Path) -> str:
    return p.read_text().strip()


FULL = CgroupLimits(
    memory_max=256 * MiB,
    memory_swap_max=0,
    cpu_weight=200,
    cpu_quota=0.5,
    cpuset_cpus=[1],
    pids_max=100,
    io_weight=100,
)


# ---------------------------------------------------------------------------- detection


def test_detect_v1_hybrid_layout(tmp_path: Path) -> None:
    make_v1(tmp_path)
    assert detect_version(tmp_path) == 1
    assert isinstance(detect(tmp_path), CgroupV1)


def test_detect_v2(tmp_path: Path) -> None:
    make_v2(tmp_path)
    assert detect_version(tmp_path) == 2
    assert isinstance(detect(tmp_path), CgroupV2)


def test_detect_nothing_mounted(tmp_path: Path) -> None:
    with pytest.raises(HostUnsupported) as exc:
        detect(tmp_path)
    assert exc.value.hint


# ---------------------------------------------------------------------------- conversions


@pytest.mark.parametrize(
    ("weight", "shares"), [(100, 1024), (1, 10), (50, 512), (10000, 102400), (200, 2048)]
)
def test_weight_to_shares(weight: int, shares: int) -> None:
    assert weight_to_shares(weight) == shares


def test_shares_clamped() -> None:
    assert weight_to_shares(0) == 2
    assert weight_to_shares(10**6) == 262144


def test_quota() -> None:
    assert quota_to_cfs(0.5) == 50000
    assert quota_to_cfs(2) == 200000
    assert quota_to_cfs(0.001) == 1000
    assert quota_to_cfs(None) == -1


def test_io_weight_map() -> None:
    assert io_weight_to_v1(1) == 10
    assert io_weight_to_v1(10000) == 1000
    assert 10 < io_weight_to_v1(100) < 1000


def test_format_cpus() -> None:
    assert format_cpus([5, 0, 1, 2]) == "0-2,5"
    assert format_cpus([3]) == "3"
    assert format_cpus([0, 2, 4, 5]) == "0,2,4-5"


def test_limits_validation() -> None:
    with pytest.raises(InvalidConfig):
        CgroupLimits(cpu_weight=0)
    with pytest.raises(InvalidConfig):
        CgroupLimits(cpuset_cpus=[])
    with pytest.raises(InvalidConfig):
        CgroupLimits(cpu_quota=0)
    with pytest.raises(TypeError):
        CgroupLimits(bogus=1)  # type: ignore[call-arg]


def test_limits_are_frozen_and_hashable() -> None:
    limits = CgroupLimits(cpuset_cpus=[0, 1])
    assert limits.cpuset_cpus == (0, 1)
    assert hash(limits) == hash(CgroupLimits(cpuset_cpus=(0, 1)))
    with pytest.raises(AttributeError):
        limits.pids_max = 3  # type: ignore[misc]
    assert limits.replace(pids_max=3) == CgroupLimits(cpuset_cpus=(0, 1), pids_max=3)
    with pytest.raises(InvalidConfig):
        limits.replace(pids_max=0)
    with pytest.raises(TypeError):
        limits.replace(bogus=1)


# ---------------------------------------------------------------------------- v1


def test_v1_create_layout_and_limits(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path))
    group = drv.create("vzkit/web", FULL)
    assert isinstance(group, V1Cgroup)
    for c in V1_CONTROLLERS:
        assert (tmp_path / c / "vzkit" / "web").is_dir()
    mem = tmp_path / "memory/vzkit/web"
    assert read(mem / "memory.limit_in_bytes") == str(256 * MiB)
    assert read(mem / "memory.memsw.limit_in_bytes") == str(256 * MiB)
    cpu = tmp_path / "cpu/vzkit/web"
    assert read(cpu / "cpu.shares") == "2048"
    assert read(cpu / "cpu.cfs_quota_us") == "50000"
    assert read(cpu / "cpu.cfs_period_us") == "100000"
    assert read(tmp_path / "cpuset/vzkit/web/cpuset.cpus") == "1"
    assert read(tmp_path / "pids/vzkit/web/pids.max") == "100"


def test_v1_cpuset_copied_from_parent(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path))
    drv.create("vzkit/web", CgroupLimits())
    for level in ("vzkit", "vzkit/web"):
        d = tmp_path / "cpuset" / level
        assert read(d / "cpuset.mems") == "0"
        assert read(d / "cpuset.cpus") == "0-3"


def test_v1_defaults_reset_to_unlimited(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path))
    group = drv.create("vzkit/web", FULL)
    group.update(CgroupLimits())
    assert read(tmp_path / "memory/vzkit/web/memory.limit_in_bytes") == "-1"
    assert read(tmp_path / "memory/vzkit/web/memory.memsw.limit_in_bytes") == "-1"
    assert read(tmp_path / "cpu/vzkit/web/cpu.cfs_quota_us") == "-1"
    assert read(tmp_path / "cpu/vzkit/web/cpu.shares") == "1024"
    assert read(tmp_path / "pids/vzkit/web/pids.max") == "max"


def test_v1_swap_adds_to_memory(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path))
    group = drv.create("g", CgroupLimits(memory_max=100 * MiB, memory_swap_max=50 * MiB))
    assert read(tmp_path / "memory/g/memory.memsw.limit_in_bytes") == str(150 * MiB)
    group.update(CgroupLimits(memory_max=10 * MiB, memory_swap_max=0))
    assert read(tmp_path / "memory/g/memory.limit_in_bytes") == str(10 * MiB)
    assert read(tmp_path / "memory/g/memory.memsw.limit_in_bytes") == str(10 * MiB)


def test_v1_without_swap_accounting(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path, memsw=False))
    drv.create("g", CgroupLimits(memory_max=64 * MiB, memory_swap_max=0))
    assert read(tmp_path / "memory/g/memory.limit_in_bytes") == str(64 * MiB)
    assert not (tmp_path / "memory/g/memory.memsw.limit_in_bytes").exists()


def test_v1_bfq_weight(tmp_path: Path) -> None:
    make_v1(tmp_path)
    (tmp_path / "blkio" / "blkio.bfq.io_serviced").write_text("")
    (tmp_path / "blkio" / "g").mkdir()
    (tmp_path / "blkio" / "g" / "blkio.bfq.weight").write_text("100")
    CgroupV1(tmp_path).create("g", CgroupLimits(io_weight=10000))
    assert read(tmp_path / "blkio/g/blkio.bfq.weight") == "1000"


def test_v1_procs_files_and_comounted(tmp_path: Path) -> None:
    make_v1(tmp_path)
    group = CgroupV1(tmp_path).create("vzkit/a", CgroupLimits())
    files = group.procs_files()
    assert len(files) == len(V1_CONTROLLERS)
    assert all(f.name == "cgroup.procs" for f in files)

    # cpu and cpuacct co-mounted with symlinks, as systemd does: one directory, one file.
    other = tmp_path / "co"
    other.mkdir()
    (other / "cpu,cpuacct").mkdir()
    (other / "cpu,cpuacct" / "cgroup.procs").write_text("")
    (other / "cpu").symlink_to("cpu,cpuacct")
    (other / "cpuacct").symlink_to("cpu,cpuacct")
    g2 = CgroupV1(other).create("x", CgroupLimits(cpu_weight=100))
    assert g2.procs_files() == [(other / "cpu,cpuacct" / "x" / "cgroup.procs").resolve()]


def test_v1_missing_controller_for_requested_limit(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cgroup.procs").write_text("")
    drv = CgroupV1(tmp_path)
    with pytest.raises(HostUnsupported, match="memory"):
        drv.create("vzkit/web", CgroupLimits(memory_max=MiB))
    # Nothing half-made survives the failure.
    assert not (tmp_path / "cpu" / "vzkit").exists()


def test_v1_stats(tmp_path: Path) -> None:
    group = CgroupV1(make_v1(tmp_path)).create("g", CgroupLimits())
    (tmp_path / "memory/g/memory.usage_in_bytes").write_text("1000\n")
    (tmp_path / "memory/g/memory.max_usage_in_bytes").write_text("2000\n")
    (tmp_path / "memory/g/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    )
    (tmp_path / "cpuacct/g/cpuacct.usage").write_text("123456789\n")
    (tmp_path / "pids/g/pids.current").write_text("4\n")
    s = group.stats()
    assert (s.memory_current, s.memory_peak, s.cpu_usage_ns, s.pids_current, s.oom_kills) == (
        1000,
        2000,
        123456789,
        4,
        3,
    )


def test_v1_open(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path))
    assert drv.open("vzkit/web") is None
    drv.create("vzkit/web", CgroupLimits())
    group = drv.open("vzkit/web")
    assert group is not None and group.exists()


def test_destroy_v1(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path))
    group = drv.create("vzkit/web", FULL)
    (tmp_path / "memory/vzkit/web/child").mkdir()
    group.destroy()
    for c in V1_CONTROLLERS:
        assert not (tmp_path / c / "vzkit" / "web").exists()
        assert (tmp_path / c / "vzkit").is_dir()
    group.destroy()  # already gone: fine
    assert not group.exists()


def test_invalid_paths(tmp_path: Path) -> None:
    drv = CgroupV1(make_v1(tmp_path))
    for bad in ("", "/", "vzkit/../etc", "./x"):
        with pytest.raises(InvalidConfig):
            drv.create(bad, CgroupLimits())


def test_write_error_names_file_and_errno(tmp_path: Path) -> None:
    group = CgroupV1(make_v1(tmp_path)).create("g", CgroupLimits())
    bad = tmp_path / "pids" / "g" / "cgroup.procs"
    bad.unlink(missing_ok=True)
    bad.mkdir()
    with pytest.raises(EngineError) as exc:
        group.add_pid(1)
    assert str(bad) in exc.value.message
    assert "EISDIR" in exc.value.message
    assert exc.value.hint


# ---------------------------------------------------------------------------- v2


def test_v2_create_enables_controllers_in_parents(tmp_path: Path) -> None:
    root = make_v2(tmp_path)
    (root / "vzkit" / "web").mkdir(parents=True)
    (root / "vzkit" / "web" / "memory.swap.max").write_text("max")
    (root / "vzkit" / "web" / "io.weight").write_text("default 100")
    group = CgroupV2(root).create("vzkit/web", FULL)
    assert isinstance(group, V2Cgroup)
    for parent in (root, root / "vzkit"):
        enabled = set(read(parent / "cgroup.subtree_control").split())
        assert enabled == {"+cpu", "+cpuset", "+memory", "+pids", "+io"}
    assert not (root / "vzkit" / "web" / "cgroup.subtree_control").exists()
    leaf = root / "vzkit" / "web"
    assert read(leaf / "memory.max") == str(256 * MiB)
    assert read(leaf / "memory.swap.max") == "0"
    assert read(leaf / "cpu.weight") == "200"
    assert read(leaf / "cpu.max") == "50000 100000"
    assert read(leaf / "cpuset.cpus") == "1"
    assert read(leaf / "pids.max") == "100"
    assert read(leaf / "io.weight") == "default 100"
    assert group.procs_files() == [leaf / "cgroup.procs"]


def test_v2_skips_enabled_controllers(tmp_path: Path) -> None:
    root = make_v2(tmp_path, "cpu memory pids")
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    CgroupV2(root).create("a", CgroupLimits())
    # Already enabled at the root: untouched (the kernel's format has no '+').
    assert read(root / "cgroup.subtree_control") == "cpu memory pids"


def test_v2_unlimited(tmp_path: Path) -> None:
    root = make_v2(tmp_path)
    CgroupV2(root).create("a", CgroupLimits())
    assert read(root / "a" / "memory.max") == "max"
    assert read(root / "a" / "cpu.max") == "max 100000"
    assert read(root / "a" / "cpu.weight") == "100"
    assert read(root / "a" / "cpuset.cpus") == ""
    assert read(root / "a" / "pids.max") == "max"


def test_v2_missing_controller(tmp_path: Path) -> None:
    root = make_v2(tmp_path, "cpu pids")
    with pytest.raises(HostUnsupported, match="memory"):
        CgroupV2(root).create("vzkit/a", CgroupLimits(memory_max=MiB))
    assert not (root / "vzkit" / "a").exists()
    # Not asked for: no error, no write.
    CgroupV2(root).create("vzkit/b", CgroupLimits(cpu_quota=1.0))
    assert not (root / "vzkit" / "b" / "memory.max").exists()


def test_v2_stats(tmp_path: Path) -> None:
    root = make_v2(tmp_path)
    group = CgroupV2(root).create("a", CgroupLimits())
    d = root / "a"
    (d / "memory.current").write_text("4096\n")
    (d / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (d / "pids.current").write_text("2\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    s = group.stats()
    assert s.memory_current == 4096
    assert s.memory_peak is None
    assert s.cpu_usage_ns == 1_500_000
    assert s.pids_current == 2
    assert s.oom_kills == 1


def test_v2_kill_uses_cgroup_kill(tmp_path: Path) -> None:
    root = make_v2(tmp_path)
    group = CgroupV2(root).create("a", CgroupLimits())
    (root / "a" / "cgroup.kill").write_text("0")
    group.kill(timeout=0.1)
    assert read(root / "a" / "cgroup.kill") == "1"


def test_v2_open(tmp_path: Path) -> None:
    root = make_v2(tmp_path)
    drv = CgroupV2(root)
    assert drv.open("a") is None
    drv.create("a", CgroupLimits())
    assert drv.open("a") is not None


# ---------------------------------------------------------------------------- kill


def _simulate_exit(proc: subprocess.Popen[bytes], files: list[Path]) -> threading.Thread:
    """Do what the kernel does when a task exits: drop it from cgroup.procs."""

    def run() -> None:
        proc.wait()
        for f in files:
            f.write_text("")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_v1_kill_signals_every_process(tmp_path: Path) -> None:
    group = CgroupV1(make_v1(tmp_path)).create("vzkit/k", CgroupLimits())
    proc = subprocess.Popen(["sleep", "30"])
    try:
        for f in group.procs_files():
            f.write_text(f"{proc.pid}\n")
        assert group.pids() == [proc.pid]
        waiter = _simulate_exit(proc, group.procs_files())
        group.kill(timeout=5)
        waiter.join(5)
        assert proc.returncode == -9
        assert read(tmp_path / "freezer/vzkit/k/freezer.state") == "THAWED"
    finally:
        proc.kill()
        proc.wait()
