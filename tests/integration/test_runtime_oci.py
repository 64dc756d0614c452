"""OCI runtime gaps against runc and the runtime-spec (issue 11): cpu.period kept as given,
process.oomScoreAdj, the memory reservation/swappiness/OOM-killer settings, a config
without a mount namespace, and resources the host cannot apply failing like runc."""

# ruff: noqa: F811  (rt: a fixture imported from test_runtime_resources, used by name)

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_runtime_resources import (  # noqa: F401 - a fixture used by name
    CG,
    V2,
    MiB,
    Runtime,
    cg_dir,
    keyed,
    rt,
)

pytestmark = pytest.mark.integration


def _read(path: str, controller: str, name: str) -> str:
    return (cg_dir(path, controller) / name).read_text().strip()


def test_cpu_period_is_kept_as_given(rt: Runtime) -> None:
    """Before, the period was replaced by 100000 (and the quota scaled to it)."""
    cid = rt.start(["sleep", "100"], {"cpu": {"quota": 25_000, "period": 50_000}})
    path = rt.cgroup(cid)
    if V2:
        assert _read(path, "cpu", "cpu.max") == "25000 50000"
    else:
        assert _read(path, "cpu", "cpu.cfs_period_us") == "50000"
        assert _read(path, "cpu", "cpu.cfs_quota_us") == "25000"
    rt("update", "--cpu-quota", "10000", "--cpu-period", "20000", cid)
    if V2:
        assert _read(path, "cpu", "cpu.max") == "10000 20000"
    else:
        assert _read(path, "cpu", "cpu.cfs_period_us") == "20000"
        assert _read(path, "cpu", "cpu.cfs_quota_us") == "10000"


def _oom_score(value: int) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["process"]["oomScoreAdj"] = value

    return edit


def test_oom_score_adj_is_applied(rt: Runtime) -> None:
    cid = rt.new_id()
    b = rt.bundle(cid, ["cat", "/proc/self/oom_score_adj"], edit=_oom_score(500))
    proc = rt("run", "--bundle", str(b), cid)
    assert proc.stdout.strip() == "500"
    # exec'd processes get the container's, as with runc.
    cid = rt.start(["sleep", "100"], edit=_oom_score(300))
    assert rt("exec", cid, "cat", "/proc/self/oom_score_adj").stdout.strip() == "300"


def test_oom_score_adj_out_of_range_is_refused(rt: Runtime) -> None:
    cid = rt.new_id()
    b = rt.bundle(cid, ["true"], edit=_oom_score(5000))
    proc = rt("run", "--bundle", str(b), cid, check=False)
    assert proc.returncode == 1
    assert "error: process.oomScoreAdj 5000 is not an integer in -1000..1000" in proc.stderr


def test_memory_reservation_swappiness_and_oom_killer(rt: Runtime) -> None:
    memory = {
        "limit": 64 * MiB,
        "reservation": 32 * MiB,
        "swappiness": 10,
        "disableOOMKiller": True,
    }
    cid = rt.start(["sleep", "100"], {"memory": memory})
    path = rt.cgroup(cid)
    if V2:
        assert _read(path, "memory", "memory.low") == str(32 * MiB)
        return  # v2 has neither swappiness nor a switch for the OOM killer
    assert _read(path, "memory", "memory.soft_limit_in_bytes") == str(32 * MiB)
    assert _read(path, "memory", "memory.swappiness") == "10"
    assert keyed(cg_dir(path, "memory") / "memory.oom_control")["oom_kill_disable"] == 1


@pytest.mark.parametrize(
    ("resources", "controller"),
    [
        ({"hugepageLimits": [{"pageSize": "2MB", "limit": 1 << 21}]}, "hugetlb"),
        ({"network": {"classID": 0x100001}}, "net_cls"),
        ({"network": {"priorities": [{"name": "eth0", "priority": 5}]}}, "net_prio"),
    ],
)
def test_limits_the_host_cannot_apply_fail_naming_the_controller(
    rt: Runtime, resources: dict[str, Any], controller: str
) -> None:
    """Before, they were ignored without a word."""
    if not V2 and (CG / controller / "cgroup.procs").exists():
        pytest.skip(f"this host has the v1 {controller} controller")
    cid = rt.new_id()
    proc = rt("run", "--bundle", str(rt.bundle(cid, ["true"], resources)), cid, check=False)
    assert proc.returncode == 1
    assert f"'{controller}' controller" in proc.stderr or "cgroup v2 has no" in proc.stderr
    assert "hint:" in proc.stderr
    assert not list(CG.glob(f"*/{rt.cgroup(cid)}")), "nothing half-made survives"
    assert not (rt.root / cid).exists()


def _no_mount_namespace(config: dict[str, Any]) -> None:
    linux = config["linux"]
    linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "mount"]
    for key in ("maskedPaths", "readonlyPaths"):
        linux.pop(key, None)


def test_without_a_mount_namespace_the_runtimes_is_shared(rt: Runtime, tmp_path: Path) -> None:
    """The spec says: inherit the runtime's mount namespace. Run in a throwaway mount
    namespace of the test's own, so that nothing of the host's is at stake; check that
    the container is in it, sees the runtime's files, and that no mount changed."""
    cid = rt.new_id()
    mark = tmp_path / "written-by-the-container"
    script = f"readlink /proc/self/ns/mnt; echo hello > {mark}"
    bundle = rt.bundle(cid, ["/bin/sh", "-c", script], edit=_no_mount_namespace)
    runtime = " ".join(rt.command)
    outer = (
        "readlink /proc/self/ns/mnt; cat /proc/self/mountinfo > before; "
        f"{runtime} --root {rt.root} run --bundle {bundle} {cid}; echo rc=$?; "
        "cat /proc/self/mountinfo > after; cmp -s before after && echo same-mounts"
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", outer],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stdout.split()
    assert "rc=0" in lines, proc.stdout + proc.stderr
    outer_ns, container_ns = lines[0], lines[1]
    assert container_ns == outer_ns, "the container must share the runtime's mount namespace"
    assert mark.read_text() == "hello\n"
    assert "same-mounts" in lines, "nothing may be mounted or unmounted"
    # The config's mounts do nothing there, and the runtime says so.
    assert "warning: no mount namespace" in proc.stderr and "mounts" in proc.stderr


def test_without_a_mount_namespace_masked_paths_are_refused(rt: Runtime) -> None:
    def edit(config: dict[str, Any]) -> None:
        ns = config["linux"]["namespaces"]
        config["linux"]["namespaces"] = [n for n in ns if n["type"] != "mount"]

    cid = rt.new_id()
    proc = rt("run", "--bundle", str(rt.bundle(cid, ["true"], edit=edit)), cid, check=False)
    assert proc.returncode == 1
    assert "linux.maskedPaths needs a mount namespace" in proc.stderr


@pytest.fixture(autouse=True)
def _needs_tools() -> None:
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux unshare")
