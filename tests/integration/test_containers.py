"""System containers through the daemon: isolation and limits."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vzkit.api.instances import InstanceCreate, InstanceState
from vzkit.errors import Conflict
from vzkit.sdk.client import Client

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


def test_config_set_changes_limits_live(vzd: Daemon, client: Client, box: str) -> None:
    r = vzd.vz("config", "set", box, "limits.memory=128MiB", "limits.cpu_weight=300")
    assert r.returncode == 0, r.stderr
    assert client.get_instance(box).limits.memory == 128 * 1024 * 1024
    # The container sees its new limit at once (cgroup v1: memory.limit_in_bytes).
    pid = client.get_instance(box).pid
    assert pid
    line = next(
        ln
        for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if ":memory:" in ln or ln.startswith("0::")
    )
    path = line.split(":", 2)[2].lstrip("/")
    base = "/sys/fs/cgroup/" + ("memory/" if ":memory:" in line else "")
    limit_file = "memory.limit_in_bytes" if ":memory:" in line else "memory.max"
    assert int(Path(base, path, limit_file).read_text()) == 128 * 1024 * 1024
    r = vzd.vz("config", "show", box)
    assert b"limits.memory" in r.stdout and b"128MiB" in r.stdout
    r = vzd.vz("config", "set", box, "limits.bogus=1")
    assert r.returncode != 0 and b"limits.cpus" in r.stderr


def test_config_set_on_a_running_vm_refuses_memory(vzd: Daemon, client: Client) -> None:
    client.create_instance(InstanceCreate(name="cfgvm"))
    try:
        r = vzd.vz("config", "set", "cfgvm", "limits.memory=512MiB")
        assert r.returncode != 0 and b"while it runs" in r.stderr and b"hint:" in r.stderr
        assert vzd.vz("config", "set", "cfgvm", "limits.cpu_weight=50").returncode == 0
        assert client.get_instance("cfgvm").limits.cpu_weight == 50
        client.stop("cfgvm")
        assert vzd.vz("config", "set", "cfgvm", "limits.memory=512MiB").returncode == 0
        client.start("cfgvm")
        _, out, _ = client.exec_capture("cfgvm", ["sh", "-c", "grep MemTotal /proc/meminfo"])
        assert int(out.split()[1]) > 400 * 1024
    finally:
        client.delete_instance("cfgvm", force=True)


def test_terminal_exec(client: Client, box: str) -> None:
    res, out, _ = client.exec_capture(box, ["sh", "-c", "tty; stty size; exit 6"], tty=True)
    assert res.exit_code == 6
    lines = out.replace(b"\r\n", b"\n").split(b"\n")
    assert lines[0].startswith(b"/dev/pts/") and lines[1] == b"24 80"


def test_unpacked_trees_go_with_their_image(private_daemon: Daemon) -> None:
    d = private_daemon
    d.start()
    c = d.client()
    c.create_instance(InstanceCreate(name="tree", type="container"))
    trees = d.settings.images_dir / "rootfs"
    assert len(list(trees.iterdir())) == 1
    with pytest.raises(Conflict):
        c.delete_image("minimal")  # still used
    c.delete_instance("tree", force=True)
    assert len(list(trees.iterdir())) == 1  # the image still refers to it
    c.delete_image("minimal")
    assert list(trees.iterdir()) == []
