"""System containers through the daemon: isolation and limits."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon
from vzkit.client import Client
from vzkit.models import InstanceCreate, InstanceState

pytestmark = pytest.mark.integration


@pytest.fixture
def box(client: Client) -> Iterator[str]:
    client.create_instance(
        InstanceCreate.model_validate(
            {"name": "box", "type": "container", "limits": {"memory": "64MiB"}}
        )
    )
    yield "box"
    client.delete_instance("box", force=True)


def sh(client: Client, name: str, script: str) -> tuple[int, str, str]:
    res, out, err = client.exec_capture(name, ["sh", "-c", script])
    return res.exit_code, out.decode(), err.decode()


def test_container_is_isolated(client: Client, box: str) -> None:
    code, out, _ = sh(client, box, "cat /proc/1/cmdline | tr '\\0' ' '")
    assert code == 0 and out.startswith("/sbin/vz-agent --reaper")
    # Only the container's own processes are visible: init and this pipeline.
    code, out, _ = sh(client, box, "ps -o pid,args")
    assert len(out.splitlines()) <= 4 and "pytest" not in out and "vzd" not in out
    assert sh(client, box, "ls /sys/class/net")[1].split() == ["lo"]
    assert sh(client, box, "hostname")[1] == "box\n"
    # A read-only path, a masked path, a dropped capability, seccomp.
    code, _, err = sh(client, box, "echo 1 > /proc/sys/kernel/domainname")
    assert code != 0 and "Read-only" in err
    assert sh(client, box, "cat /proc/kcore 2>/dev/null | wc -c")[1].strip() == "0"
    cap_eff = int(sh(client, box, "grep CapEff /proc/self/status")[1].split()[1], 16)
    assert not cap_eff & (1 << 21), "CAP_SYS_ADMIN must be dropped"
    code, _, err = sh(client, box, "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x")
    assert code != 0


def test_memory_limit_oom_kills_with_a_reason(client: Client, box: str) -> None:
    res, _, _ = client.exec_capture(box, ["sh", "-c", "tail /dev/zero"], timeout=60)
    assert res.signal == signal.SIGKILL
    assert res.error and "out-of-memory" in res.error
    assert client.get_instance(box).state is InstanceState.RUNNING


def test_container_survives_daemon_sigkill(vzd: Daemon, client: Client, box: str) -> None:
    pid = client.get_instance(box).pid
    vzd.kill(signal.SIGKILL)
    vzd.start()
    c = vzd.client()
    inst = c.get_instance(box)
    assert inst.state is InstanceState.RUNNING and inst.pid == pid
    assert c.exec_capture(box, ["echo", "ok"])[1] == b"ok\n"
