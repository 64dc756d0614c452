"""Events, usage numbers and Prometheus metrics from a real daemon."""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import wait_for
from vzkit.api.events import Event
from vzkit.errors import NotFound
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

_SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+$')


def _collect(c: Client, until: str, out: list[Event], ready: threading.Event) -> None:
    for event in c.events(["instance-created", "instance-state", "instance-deleted"]):
        ready.set()
        out.append(event)
        if event.type == "instance-deleted" and event.instance == until:
            return


def test_lifecycle_events_in_order(client: Client, vzd: Daemon) -> None:
    events: list[Event] = []
    ready = threading.Event()
    # A marker instance makes sure the subscription is live before the real work starts.
    watcher = threading.Thread(target=_collect, args=(vzd.client(), "evt", events, ready))
    watcher.start()
    while not ready.is_set():
        client.create_instance({"name": "marker", "type": "container", "start": False})
        client.delete_instance("marker")
        ready.wait(0.5)
    client.create_instance({"name": "evt", "type": "container"})
    client.stop("evt", force=True)
    client.delete_instance("evt")
    watcher.join(30)
    mine = [e for e in events if e.instance == "evt"]
    seen = [e.type if e.type != "instance-state" else e.data["state"] for e in mine]
    assert seen == [
        "instance-created", "stopped", "starting", "running", "stopping", "stopped",
        "instance-deleted",
    ]  # fmt: skip
    assert mine[5].data["reason"] == "stopped by request"
    assert all(a.time <= b.time for a, b in itertools.pairwise(mine))


def test_monitor_cli_prints_events(client: Client, vzd: Daemon) -> None:
    mon = subprocess.Popen(
        [sys.executable, "-m", "vzkit.cli.main", "monitor", "--type", "instance-created",
         "--format", "json"],
        env=vzd.env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert mon.stdout is not None
        line = ""
        for i in range(50):
            client.create_instance({"name": f"mon{i}", "type": "container", "start": False})
            client.delete_instance(f"mon{i}")
            # Once monitor is subscribed, the next creation shows up as a line.
            if select.select([mon.stdout], [], [], 0.2)[0]:
                line = mon.stdout.readline()
                break
        event = json.loads(line)
        assert event["type"] == "instance-created" and event["instance"].startswith("mon")
    finally:
        mon.terminate()
        mon.wait(10)


def test_usage_numbers_and_prometheus_text(client: Client, vzd: Daemon) -> None:
    client.create_instance({"name": "busy", "type": "container"})
    client.exec_capture("busy", ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
    stats = {s.name: s for s in client.stats()}
    busy = stats["busy"]
    assert busy.state == "running" and busy.cpu_seconds and busy.cpu_seconds > 0.01
    assert busy.memory_bytes and busy.memory_bytes > 0 and busy.pids and busy.pids >= 1
    r = vzd.vz("top", "--once", "--format", "json")
    assert r.returncode == 0 and "busy" in {s["name"] for s in json.loads(r.stdout)}
    r = vzd.vz("top", "--once")
    assert r.stdout.decode().splitlines()[0].split()[:4] == ["NAME", "TYPE", "STATE", "CPU"]

    # /metrics is outside the SDK's resources: a plain GET on the socket.
    raw, resp = client._raw("GET", "/metrics")
    assert resp.getheader("Content-Type", "").startswith("text/plain")
    text = raw.decode()
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    bad = [ln for ln in samples if not _SAMPLE.match(ln)]
    assert not bad, bad
    cpu = next(
        ln for ln in samples if ln.startswith('vz_instance_cpu_seconds_total{instance="busy"}')
    )
    assert float(cpu.split()[-1]) > 0.01
    assert 'vz_instance_state{instance="busy",type="container",state="running"} 1' in samples
    assert any(
        ln.startswith('vz_api_requests_total{method="GET",route="/1.0/stats",status="200"}')
        for ln in samples
    )


def test_background_operations(client: Client, vzd: Daemon) -> None:
    op = client.submit("POST", "/1.0/instances", {"name": "bg", "type": "container"})
    assert op.resource == "bg" and op.kind == "instance-create"
    done = client.wait_operation(op.id, timeout=60)
    assert done.status == "success", done.error
    assert done.result["name"] == "bg" and done.result["state"] == "running"
    op = client.submit("PUT", "/1.0/instances/bg/state", {"action": "stop", "force": True})
    assert client.wait_operation(op.id, 60).result["state"] == "stopped"

    failed = client.submit("POST", "/1.0/instances", {"name": "bad", "image": "nope"})
    done = client.wait_operation(failed.id, 30)
    assert done.status == "failure" and done.error and done.error["code"] == "not_found"
    with pytest.raises(NotFound):
        client.submit("PUT", "/1.0/instances/ghost/state", {"action": "start"})
    with pytest.raises(NotFound):
        client.get_operation("no-such-op")
    assert {op.id, failed.id} <= {o.id for o in client.list_operations()}

    # Cancelling a boot half-way unwinds it: no instance, no QEMU.
    slow = client.submit("POST", "/1.0/instances", {"name": "slow"})
    time.sleep(0.5)
    assert client.cancel_operation(slow.id).status == "cancelled"
    assert "slow" not in {i.name for i in client.list_instances()}
    assert wait_for(lambda: not vzd.qemu_pids(), 10)


def test_mutating_calls_are_audited(client: Client, vzd: Daemon) -> None:
    client.create_instance({"name": "aud", "type": "container", "start": False})
    client.delete_instance("aud")
    lines = [
        json.loads(ln) for ln in (vzd.settings.state_dir / "audit.log").read_text().splitlines()
    ]
    mine = [
        (e["method"], e["path"], e["status"])
        for e in lines
        if "aud" in e["path"] or (e["method"] == "POST" and e["path"] == "/1.0/instances")
    ]
    assert ("POST", "/1.0/instances", 201) in mine and ("DELETE", "/1.0/instances/aud", 204) in mine
    # Who: the local socket's caller by uid (SO_PEERCRED).
    assert {e["caller"] for e in lines if "aud" in e["path"]} == {f"unix:uid={os.getuid()}"}
    assert not any(e["method"] == "GET" for e in lines), "reads are not audited"
