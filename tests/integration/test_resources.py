"""Each QEMU runs in its own cgroup with the limits derived from the instance's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Daemon
from vzkit.api.instances import InstanceCreate
from vzkit.host.cgroups import detect_version, weight_to_shares
from vzkit.host.resources import TCG_TB_SIZE_MIB, qemu_memory_limit
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CG = Path("/sys/fs/cgroup")


def cgroup_of(pid: int, controller: str) -> Path:
    """The directory of pid's cgroup: its v2 cgroup, or its cgroup in a v1 controller."""
    v2 = detect_version(CG) == 2
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and controller in controllers.split(",")):
            # v1 mounts "cpu,cpuacct" with a "cpu" symlink beside it, so the name works.
            return CG / ("" if v2 else controller) / path.lstrip("/")
    raise AssertionError(f"pid {pid} is in no {controller} cgroup")


def test_qemu_gets_its_own_cgroup_with_limits(vzd: Daemon, client: Client) -> None:
    if len(client.host_info().cpu_affinity) < 2:
        pytest.skip("needs two host CPUs to test pinning")
    client.create_instance(
        InstanceCreate.model_validate(
            {"name": "limited", "limits": {"memory": "192MiB", "cpu_weight": 300, "cpu_pin": [1]}}
        )
    )
    pid = client.get_instance("limited").pid
    assert pid
    parent = vzd.env["VZ_CGROUP_PARENT"]
    mem = cgroup_of(pid, "memory")
    assert mem.name == "limited" and mem.parent.name == parent
    want = qemu_memory_limit(192 * MiB, cpus=1, tb_size_mib=TCG_TB_SIZE_MIB)
    if detect_version(CG) == 2:
        assert int((mem / "memory.max").read_text()) == want
        assert (mem / "cpu.weight").read_text().strip() == "300"
    else:
        assert int((mem / "memory.limit_in_bytes").read_text()) == want
        cpu = cgroup_of(pid, "cpu")
        assert int((cpu / "cpu.shares").read_text()) == weight_to_shares(300)
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Cpus_allowed_list:\t1\n" in status
    # The guest still works within those limits, and its cgroup goes with it.
    assert client.exec_capture("limited", ["true"])[0].exit_code == 0
    client.delete_instance("limited", force=True)
    assert not mem.exists()
