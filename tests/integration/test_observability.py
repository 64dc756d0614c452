"""Events, usage numbers and Prometheus metrics from a real daemon."""

from __future__ import annotations

import itertools
import json
import re
import select
import subprocess
import sys
import threading

import pytest

from tests.conftest import Daemon
from vzkit.client import Client
from vzkit.events import Event

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

    text = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(vzd.socket), "http://vzd/metrics"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
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
