"""Networks through the daemon, with vzd running inside a network namespace of the test's own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon
from vzkit.errors import Conflict, InvalidConfig, NotFound

pytestmark = pytest.mark.integration


def in_ns(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    ).stdout


def dnsmasq_pids(d: Daemon) -> list[int]:
    """Processes in the daemon's namespace other than vzd itself."""
    assert d.netns and d.proc
    out = subprocess.run(["ip", "netns", "pids", d.netns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != d.proc.pid]


@pytest.fixture
def netd(private_daemon: Daemon) -> Iterator[Daemon]:
    ns = f"vzt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        in_ns(ns, "ip", "link", "set", "lo", "up")
        private_daemon.netns = ns
        private_daemon.start()
        yield private_daemon
    finally:
        private_daemon.stop()
        # dnsmasq outlives vzd by design; everything in the namespace goes with it.
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_network_lifecycle(netd: Daemon) -> None:
    c = netd.client()
    ns = netd.netns
    assert ns
    r = netd.vz("network", "create", "lab", "--subnet", "10.91.0.0/24")
    assert r.returncode == 0, r.stderr
    net = c.get_network("lab")
    assert str(net.subnet) == "10.91.0.0/24" and str(net.gateway) == "10.91.0.1"
    assert net.bridge
    links = json.loads(in_ns(ns, "ip", "-j", "addr", "show", net.bridge))
    assert any(a["local"] == "10.91.0.1" for a in links[0]["addr_info"])
    assert "table inet vzkit" in in_ns(ns, "nft", "list", "tables")
    assert dnsmasq_pids(netd), "dnsmasq runs in the namespace"

    # A second network gets a free subnet of its own; clashes are refused.
    auto = c.create_network({"name": "auto"})
    assert auto.subnet and net.subnet and not auto.subnet.overlaps(net.subnet)
    with pytest.raises(Conflict):
        c.create_network({"name": "lab"})
    with pytest.raises(Conflict):
        c.create_network({"name": "clash", "subnet": "10.91.0.0/25"})
    with pytest.raises(InvalidConfig):
        c.create_network({"name": "bad", "subnet": "10.92.0.0/30"})
    assert [n.name for n in c.list_networks()] == ["auto", "lab"]

    # After a daemon restart everything is still there, once.
    netd.kill(signal.SIGKILL)
    netd.start()
    c = netd.client()
    assert [n.name for n in c.list_networks()] == ["auto", "lab"]
    bridges = json.loads(in_ns(ns, "ip", "-j", "link", "show", "type", "bridge"))
    assert sorted(b["ifname"] for b in bridges) == sorted([str(net.bridge), str(auto.bridge)])

    c.delete_network("lab")
    c.delete_network("auto")
    with pytest.raises(NotFound):
        c.get_network("lab")
    assert json.loads(in_ns(ns, "ip", "-j", "link", "show", "type", "bridge")) == []
    assert "vzkit" not in in_ns(ns, "nft", "list", "tables")
    assert dnsmasq_pids(netd) == [], "no dnsmasq left"
