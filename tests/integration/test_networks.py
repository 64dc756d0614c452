"""Networks through the daemon, with vzd running inside a network namespace of the test's own."""

from __future__ import annotations

import json
import signal

import pytest

from tests.conftest import Daemon
from tests.integration.netns import dnsmasq_pids, in_ns
from vzkit.errors import Conflict, InvalidConfig, NotFound

pytestmark = pytest.mark.integration


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
    tables = in_ns(ns, "nft", "list", "tables").split("\n")
    own = f"vzkit-{netd.settings.daemon_id}"
    assert f"table inet {own}" in tables and f"table bridge {own}" in tables
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
