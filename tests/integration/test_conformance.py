"""One lifecycle suite for every engine: container, vm and microvm behave the same."""

from __future__ import annotations

import io
import os
import signal

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import recorded_state, wait_for
from vzkit._proc import alive
from vzkit.api.instances import InstanceCreate, InstanceState
from vzkit.errors import StateError
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

TYPES = ["container", "microvm", "vm"]


@pytest.mark.parametrize("kind", TYPES)
def test_lifecycle_is_the_same_for_every_type(vzd: Daemon, client: Client, kind: str) -> None:
    name = f"conf-{kind}"
    client.create_instance(InstanceCreate.model_validate({"name": name, "type": kind}))
    inst = client.get_instance(name)
    assert inst.state is InstanceState.RUNNING and inst.type.value == kind
    assert inst.pid and alive(inst.pid)

    # exec: exit codes, stdin, stdout/stderr separation, binary data, env and cwd
    res, out, err = client.exec_capture(
        name,
        ["sh", "-c", 'cat; echo "$A" >&2; pwd; exit 3'],
        stdin=b"\x00\xffin",
        env={"A": "env-ok"},
        cwd="/tmp",
    )
    assert (res.exit_code, out, err) == (3, b"\x00\xffin/tmp\n", b"env-ok\n")
    assert client.exec_capture(name, ["hostname"])[1] == f"{name}\n".encode()

    # files
    data = os.urandom(100_000)
    client.push_file(name, "/root/blob", io.BytesIO(data), mode=0o600)
    mode, chunks = client.pull_file(name, "/root/blob")
    assert mode & 0o777 == 0o600 and b"".join(chunks) == data

    # pause / resume
    client.pause(name)
    assert client.get_instance(name).state is InstanceState.PAUSED
    with pytest.raises(StateError):
        client.exec_capture(name, ["true"])
    client.resume(name)
    assert client.exec_capture(name, ["true"])[0].exit_code == 0

    # stop / start / restart (a container keeps its files in its overlay; the minimal
    # image of a VM lives in RAM, so a VM's files go with a reboot)
    client.stop(name)
    inst = client.get_instance(name)
    assert inst.state is InstanceState.STOPPED and inst.pid is None
    with pytest.raises(StateError):
        client.exec_capture(name, ["true"])
    client.start(name)
    client.restart(name)
    kept = client.exec_capture(name, ["cat", "/root/blob"])[1]
    assert kept == (data if kind == "container" else b"")

    # an instance whose process is killed from outside is crashed, and can start again
    pid = client.get_instance(name).pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    # Noticed by the daemon itself (how soon: benchmarks/latencies.py).
    assert wait_for(lambda: recorded_state(vzd, name) is InstanceState.CRASHED, 60)
    assert client.get_instance(name).reason
    client.start(name)

    client.delete_instance(name, force=True)
    assert all(i.name != name for i in client.list_instances())
