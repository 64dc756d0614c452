"""Two daemons on one host: each owns its links, nft tables and cgroups, and never touches the
other's. Both run in ONE network namespace of the test's own (netns.py) and share one cgroup
parent, as two vzd with different state dirs on one host would."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import wait_for
from tests.integration.netns import (
    OUTSIDE,
    UPLINK,
    cgroup_of,
    connect,
    in_ns,
    own_links,
    ping,
    serve,
    sh,
)
from vzkit.errors import DaemonUnavailable
from vzkit.network import links, nft
from vzkit.network.dnsmasq import Dnsmasq
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

CONTAINER = {"type": "container", "image": "minimal"}


def _web(c: Client, reply: str, host_port: int, allowed: str) -> str:
    """``web`` answers ``reply`` on 7000, forwarded from ``host_port``, open to ``allowed``
    and to the outside world only; its address."""
    serve(c, "web", reply=reply)
    c.add_port("web", host_port, 7000)
    ip = c.get_instance(allowed).nics[0].ip
    rules = [{"source": f"{src}/32", "proto": "tcp", "port": 7000} for src in (ip, OUTSIDE)]
    c.set_firewall("web", rules)
    return str(c.get_instance("web").nics[0].ip)


def _reaches(c: Client, client: str, target: str, reply: str) -> bool:
    _, out = sh(c, client, f"echo x | nc -w 2 {target} 7000")
    return reply in out


def test_two_daemons_share_a_namespace(daemon_pair: tuple[Daemon, Daemon]) -> None:
    a, b = daemon_pair
    a.start()
    b.start()
    ns, world = a.netns, a.world
    assert ns and world
    ca, cb = a.client(), b.client()
    ida, idb = a.settings.daemon_id, b.settings.daemon_id
    assert ida != idb

    # B first: its network turns ip_forward on, so B holds the value to restore.
    cb.create_network({"name": "lab"})
    for name in ("web", "friend"):
        cb.create_instance({**CONTAINER, "name": name, "nics": [{"network": "lab"}]})
    web_b = _web(cb, "from-b", 8081, "friend")
    # A: the default network vzbr0, the same instance names, and a microVM (a TAP).
    for name in ("web", "friend", "stranger"):
        ca.create_instance({**CONTAINER, "name": name})
    ca.create_instance({"name": "vm"})
    web_a = _web(ca, "from-a", 8080, "friend")
    friend_a = ca.get_instance("friend").nics[0].ip
    assert cb.get_network("lab").bridge != "vzbr0", "an automatic name avoids A's bridge"

    # B wants vzbr0 too: refused, naming whose it is, and nothing half-made.
    r = b.vz("launch", "minimal", "other", "--type", "container")
    assert r.returncode == 1
    assert (
        f"bridge vzbr0 exists and belongs to another vzkit daemon (id {ida}, "
        f"state dir {a.settings.state_dir})"
    ).encode() in r.stderr, r.stderr
    assert b"hint:" in r.stderr
    assert [i.name for i in cb.list_instances()] == ["friend", "web"]
    assert [n.name for n in cb.list_networks()] == ["lab"]

    # One instance name, two cgroups.
    pid_a, pid_b = ca.get_instance("web").pid, cb.get_instance("web").pid
    assert pid_a and pid_b
    assert cgroup_of(pid_a).endswith(f"/{ida}/web") and cgroup_of(pid_b).endswith(f"/{idb}/web")

    links_a = own_links(ns, ida)
    assert "vzbr0" in links_a and len(links_a) == 5  # the bridge, three veths, a TAP
    tables_a = nft.listing(ida, ns)
    assert f"table inet vzkit-{ida}" in tables_a and "dport 8080" in tables_a
    dns_a = Dnsmasq.for_network(a.settings, ca.get_network("vzbr0")).pid

    def a_is_intact() -> None:
        assert own_links(ns, ida) == links_a
        assert nft.listing(ida, ns) == tables_a
        assert Dnsmasq.for_network(a.settings, ca.get_network("vzbr0")).pid == dns_a
        assert connect(ns, "127.0.0.1", 8080) == b"from-a\n"
        assert connect(world, UPLINK, 8080) == b"from-a\n"
        assert _reaches(ca, "friend", web_a, "from-a")
        assert not _reaches(ca, "stranger", web_a, "from-a"), "the allow-list holds"
        assert ping(ca, "friend", OUTSIDE)[0] == 0, "NAT"
        assert ping(ca, "vm", str(friend_a))[0] == 0, "the VM's TAP"
        assert cgroup_of(pid_a).endswith(f"/{ida}/web")

    a_is_intact()
    assert connect(ns, "127.0.0.1", 8081) == b"from-b\n"
    assert _reaches(cb, "friend", web_b, "from-b")
    # The daemons' networks do not reach each other (other than through host ports).
    assert not _reaches(ca, "friend", web_b, "from-b")

    # B crashes and starts again: A keeps everything, B gets its own back.
    b.kill(signal.SIGKILL)
    b.start()
    cb = b.client()
    a_is_intact()
    assert wait_for(lambda: connect(ns, "127.0.0.1", 8081) == b"from-b\n", 10)

    # B removes all it has (its instance "web" and cgroup too): still nothing of A's goes.
    for name in ("web", "friend"):
        cb.delete_instance(name, force=True)
    cb.delete_network("lab")
    assert own_links(ns, idb) == {} and nft.listing(idb, ns) == ""
    assert in_ns(ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1", "A still routes"
    a_is_intact()
    assert sh(ca, "web", "true")[0] == 0


def test_vz_never_starts_a_daemon_for_a_dead_test_daemon(netd: Daemon) -> None:
    """`vz` in the tests passes --no-autostart: a vzd it started would run in the test's
    namespace (the host's) with this daemon's networks."""
    c = netd.client()
    lab = c.create_network({"name": "lab", "subnet": "10.84.0.0/24"})
    netd.kill(signal.SIGKILL)
    r = netd.vz("network", "list")
    assert r.returncode != 0 and b"cannot reach vzd" in r.stderr, r.stderr
    with pytest.raises(DaemonUnavailable):
        netd.client().server_info()
    # Nothing of this daemon's appeared in the test's own namespace (the host's).
    assert lab.bridge and links.list_owned(netd.settings.daemon_id) == []
    netd.start()
    assert [n.name for n in netd.client().list_networks()] == ["lab"]
