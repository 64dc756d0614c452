"""Every lifecycle transition of micro-VMs and VMs, through the real daemon and QEMU."""

from __future__ import annotations

import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import recorded_state, wait_for
from vzkit._proc import alive
from vzkit.api.instances import InstanceCreate, InstanceState, InstanceType, Limits
from vzkit.errors import StateError
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def launch(client: Client, name: str, **kw: object) -> None:
    client.create_instance(InstanceCreate.model_validate({"name": name, **kw}))


def test_run_prints_guest_kernel_and_leaves_nothing(vzd: Daemon, client: Client) -> None:
    r = vzd.vz("run", "minimal", "--", "uname", "-r")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip().endswith("-cloud-amd64")
    assert client.list_instances() == []
    assert wait_for(lambda: not vzd.qemu_pids(), 30)


def test_run_passes_exit_code_stdin_and_env(vzd: Daemon) -> None:
    r = vzd.vz(
        "run",
        "minimal",
        "--env",
        "GREETING=hi there",
        "--workdir",
        "/tmp",
        "--",
        "sh",
        "-c",
        'cat; echo "$GREETING"; pwd; exit 7',
        input=b"from stdin\n",
    )
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"from stdin\nhi there\n/tmp\n"


def test_microvm_lifecycle(client: Client) -> None:
    launch(client, "life", limits={"cpus": 2, "memory": "192MiB"})
    inst = client.get_instance("life")
    assert inst.state is InstanceState.RUNNING
    assert inst.type is InstanceType.MICROVM
    assert inst.pid and alive(inst.pid)
    res, out, _ = client.exec_capture("life", ["nproc"])
    assert (res.exit_code, out) == (0, b"2\n")
    res, out, _ = client.exec_capture("life", ["sh", "-c", "grep MemTotal /proc/meminfo"])
    assert 150 * 1024 < int(out.split()[1]) <= 192 * 1024

    client.pause("life")
    assert client.get_instance("life").state is InstanceState.PAUSED
    with pytest.raises(StateError) as e:
        client.exec_capture("life", ["true"])
    assert "paused" in str(e.value) and e.value.hint and "vz resume life" in e.value.hint
    with pytest.raises(StateError):
        client.pause("life")
    client.resume("life")
    assert client.exec_capture("life", ["true"])[0].exit_code == 0

    old_pid = client.get_instance("life").pid
    client.restart("life")
    inst = client.get_instance("life")
    assert inst.state is InstanceState.RUNNING and inst.pid != old_pid
    assert client.exec_capture("life", ["true"])[0].exit_code == 0

    client.stop("life")
    inst = client.get_instance("life")
    assert inst.state is InstanceState.STOPPED and inst.pid is None
    assert old_pid and not alive(old_pid)
    with pytest.raises(StateError):
        client.pause("life")
    with pytest.raises(StateError):
        client.stop("life")
    client.start("life")
    assert client.exec_capture("life", ["echo", "again"])[1] == b"again\n"
    with pytest.raises(StateError) as e:
        client.delete_instance("life")
    assert e.value.hint and "--force" in e.value.hint
    client.stop("life", force=True)
    client.delete_instance("life")
    assert all(i.name != "life" for i in client.list_instances())


def test_exec_exit_codes_binary_and_stderr(client: Client) -> None:
    launch(client, "ex")
    for code in (0, 1, 42, 255):
        assert client.exec_capture("ex", ["sh", "-c", f"exit {code}"])[0].exit_code == code
    blob = bytes(range(256)) * 4096  # 1 MiB with every byte value
    res, out, err = client.exec_capture("ex", ["cat"], stdin=blob)
    assert res.exit_code == 0 and out == blob and err == b""
    res, out, err = client.exec_capture("ex", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.exit_code, out, err) == (3, b"out\n", b"err\n")
    res, _, _ = client.exec_capture("ex", ["no-such-command"])
    assert res.exit_code == 127 and res.error
    res, _, _ = client.exec_capture("ex", ["sleep", "30"], timeout=1)
    assert res.timed_out and res.exit_code != 0
    res, _, _ = client.exec_capture("ex", ["sh", "-c", "kill -TERM $$"])
    assert res.signal == signal.SIGTERM and res.exit_code == 128 + signal.SIGTERM


def test_file_push_and_pull(client: Client) -> None:
    launch(client, "files")
    data = os.urandom(3 * MiB + 17)
    client.push_file("files", "/tmp/sub/blob", io.BytesIO(data), mode=0o640, parents=True)
    _, out, _ = client.exec_capture("files", ["stat", "-c", "%a %s", "/tmp/sub/blob"])
    assert out.decode().split() == ["640", str(len(data))]
    mode, chunks = client.pull_file("files", "/tmp/sub/blob")
    assert mode & 0o777 == 0o640 and b"".join(chunks) == data


def test_vm_type_boots_q35(client: Client) -> None:
    launch(client, "q35", type="vm")
    inst = client.get_instance("q35")
    assert inst.type is InstanceType.VM
    res, out, _ = client.exec_capture("q35", ["sh", "-c", "ls /sys/bus/pci/devices | wc -l"])
    assert res.exit_code == 0 and int(out) > 3  # a PCI bus: not a microvm


def test_qemu_killed_from_outside_is_crashed(vzd: Daemon, client: Client) -> None:
    launch(client, "victim")
    pid = client.get_instance("victim").pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    # Seen without any request touching the instance (how soon: benchmarks/latencies.py).
    assert wait_for(lambda: recorded_state(vzd, "victim") is InstanceState.CRASHED, 60)
    inst = client.get_instance("victim")
    assert inst.reason and "without a guest shutdown" in inst.reason and inst.pid is None
    client.start("victim")  # a crashed instance can be started again
    assert client.exec_capture("victim", ["true"])[0].exit_code == 0


def test_guest_poweroff_is_a_clean_stop(client: Client) -> None:
    launch(client, "selfoff")
    client.exec_capture("selfoff", ["sh", "-c", "(sleep 0.2; poweroff -f) &"])
    assert wait_for(lambda: client.get_instance("selfoff").state is InstanceState.STOPPED, 60)


def test_daemon_sigkill_keeps_instances_running(vzd: Daemon, client: Client) -> None:
    names = ["keep1", "keep2", "keep3"]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: launch(client, n), names))
    pids = {n: client.get_instance(n).pid for n in names}
    client.pause("keep3")
    vzd.kill(signal.SIGKILL)
    for pid in pids.values():
        assert pid and alive(pid)
    vzd.start()
    client = vzd.client()
    for n in names:
        inst = client.get_instance(n)
        assert inst.pid == pids[n]
        assert inst.state is (InstanceState.PAUSED if n == "keep3" else InstanceState.RUNNING)
    client.resume("keep3")
    for n in names:
        assert client.exec_capture(n, ["echo", n])[1] == f"{n}\n".encode()
    # Exits are still watched after the re-attach.
    pid = pids["keep1"]
    assert pid
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: recorded_state(vzd, "keep1") is InstanceState.CRASHED, 60)
    client.stop("keep2")
    assert client.get_instance("keep2").state is InstanceState.STOPPED


def test_forty_boots_two_at_a_time_never_hang(client: Client) -> None:
    def boot(i: int) -> bytes:
        with client.run("minimal", limits=Limits(cpus=1, memory=128 * MiB)) as vm:
            res, out, _ = vm.exec_capture(["cat", "/proc/sys/kernel/hostname"])
            assert res.exit_code == 0
            return out

    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(boot, range(40)))
    assert len(outs) == 40 and all(outs)
    assert client.list_instances() == []
    # Each boot is ~2.5 s under TCG; a hang would blow this by minutes.
    assert time.monotonic() - start < 40 * 15


@pytest.mark.slow
def test_debian_image_boots_with_its_own_disk(client: Client) -> None:
    launch(client, "deb", image="debian", limits={"memory": "512MiB"})
    res, out, _ = client.exec_capture(
        "deb", ["sh", "-c", ". /etc/os-release; echo $ID $VERSION_ID; hostname"]
    )
    assert res.exit_code == 0 and out == b"debian 12\ndeb\n"
    # Writes go to the instance's overlay and survive a restart.
    client.exec_capture("deb", ["sh", "-c", "echo kept > /root/state; sync"])
    client.restart("deb")
    assert client.exec_capture("deb", ["cat", "/root/state"])[1] == b"kept\n"
    res, out, _ = client.exec_capture("deb", ["python3", "-c", "print(6 * 7)"])
    assert out == b"42\n"


def test_cli_exec_passes_binary_through(vzd: Daemon, client: Client) -> None:
    launch(client, "bin")
    blob = os.urandom(256 * 1024) + bytes(range(256))
    r = vzd.vz("exec", "bin", "--", "sh", "-c", "cat; exit 5", input=blob)
    assert r.returncode == 5 and r.stdout == blob, r.stderr
    r = vzd.vz("file", "pull", "bin:/proc/version", "-")
    assert r.returncode == 0 and r.stdout.startswith(b"Linux version")
