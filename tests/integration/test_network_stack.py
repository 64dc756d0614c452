"""The network library against the real kernel, inside namespaces these tests create.

A throw-away namespace stands in for the host; "instances" are namespaces with a veth into
a bridge, and an "outside" namespace is the host's uplink. No packet leaves these
namespaces (dnsmasq gets no upstream servers). Everything is built once per module (it
takes a few seconds) and torn down by the last test, which checks nothing is left.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2 import netns as pr_netns

from tests.integration.helpers import wait_for
from vzkit._proc import alive
from vzkit.api.networks import FirewallRule, NetworkConfig, PortForward
from vzkit.errors import Conflict
from vzkit.network import ipam, links, nft
from vzkit.network._netns import entered
from vzkit.network.dnsmasq import Dnsmasq, HostEntry

pytestmark = pytest.mark.integration

TAG = uuid.uuid4().hex[:6]
DAEMON = uuid.uuid4().hex[:8]  # the identity these tests' links and tables carry
NAT = NetworkConfig.model_validate({"name": "nat", "subnet": "10.80.0.0/24", "bridge": "vzbr0"})
ISO = NetworkConfig.model_validate(
    {"name": "iso", "subnet": "10.80.1.0/24", "bridge": "vzbr1", "isolated": True}
)
# The instances' own addresses (dh's is its DHCP reservation), which anti-spoofing enforces.
ADDRESSES = {
    "a1": IPv4Address("10.80.0.5"),
    "a2": IPv4Address("10.80.0.6"),
    "b1": IPv4Address("10.80.1.5"),
    "dh": IPv4Address("10.80.0.20"),
}
HOST_UPLINK = IPv4Address("192.0.2.1")
OUTSIDE = IPv4Address("192.0.2.2")


@dataclass
class World:
    state: Path
    host: str
    outside: str
    instances: dict[str, str] = field(default_factory=dict)  # name -> netns
    dnsmasqs: list[Dnsmasq] = field(default_factory=list)
    forwards: list[PortForward] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"vzt{TAG}-{name}"

    def ruleset(self, *firewalls: nft.InstanceFirewall) -> nft.Ruleset:
        ports = [
            nft.PortGuard(links.link_name("v", name + TAG, 0), ipam.stable_mac(name + TAG, 0), ip)
            for name, ip in ADDRESSES.items()
        ]
        return nft.Ruleset(
            daemon=DAEMON,
            networks=[NAT, ISO],
            forwards=self.forwards,
            firewalls=firewalls,
            ports=ports,
            state_dir=str(self.state),
        )


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        check=check,
        timeout=20,
    )


def serve(ns: str, ip: str, port: int, reply: bytes) -> socket.socket:
    """A TCP server in ``ns`` (the socket keeps the namespace it was made in)."""
    with entered(ns):
        srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen()

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(reply)

    threading.Thread(target=loop, daemon=True).start()
    return srv


def connect(ns: str, ip: str, port: int, timeout: float = 1.0) -> bytes | None:
    """What the server at ip:port says to a client in ``ns``, or None if unreachable."""
    with entered(ns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return s.recv(64)
    except OSError:
        return None
    finally:
        s.close()


def add_instance(w: World, name: str, net: NetworkConfig, ip: str | None) -> str:
    ns = w.ns(name)
    pr_netns.create(ns)
    w.instances[name] = ns
    assert net.bridge is not None and net.subnet is not None
    links.ensure_veth(
        links.link_name("v", name + TAG, 0),
        ns,
        bridge=net.bridge,
        mac=ipam.stable_mac(name + TAG, 0),
        network=net.name,
        instance=name,
        daemon=DAEMON,
        address=IPv4Interface(f"{ip}/{net.subnet.prefixlen}") if ip else None,
        gateway=net.gateway if ip else None,
        netns=w.host,
    )
    return ns


def teardown(w: World) -> None:
    for d in w.dnsmasqs:
        d.stop()
    if w.host in pr_netns.listnetns():
        nft.remove(DAEMON, w.state, netns=w.host)
        for link in links.list_owned(DAEMON, w.host):
            links.delete_link(link.name, netns=w.host)
    for ns in [*w.instances.values(), w.outside, w.host]:
        if ns in pr_netns.listnetns():
            pr_netns.remove(ns)
    w.instances.clear()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("net"), f"vzt{TAG}-host", f"vzt{TAG}-out")
    try:
        pr_netns.create(w.host)
        pr_netns.create(w.outside)
        sh(w.host, "ip", "link", "set", "lo", "up")
        # The host's uplink: a veth to the "outside" namespace (TEST-NET-1 addresses).
        sh(w.host, "ip", "link", "add", "up0", "type", "veth", "peer", "eth0", "netns", w.outside)
        sh(w.host, "ip", "addr", "add", f"{HOST_UPLINK}/24", "dev", "up0")
        sh(w.host, "ip", "link", "set", "up0", "up")
        sh(w.outside, "ip", "addr", "add", f"{OUTSIDE}/24", "dev", "eth0")
        sh(w.outside, "ip", "link", "set", "eth0", "up")
        sh(w.outside, "ip", "link", "set", "lo", "up")
        for net in (NAT, ISO):
            assert net.bridge and net.gateway and net.subnet
            links.ensure_bridge(
                net.bridge,
                IPv4Interface(f"{net.gateway}/{net.subnet.prefixlen}"),
                net.name,
                daemon=DAEMON,
                netns=w.host,
            )
        add_instance(w, "a1", NAT, "10.80.0.5")
        add_instance(w, "a2", NAT, "10.80.0.6")
        add_instance(w, "b1", ISO, "10.80.1.5")
        add_instance(w, "dh", NAT, None)
        w.forwards = [PortForward(host_port=8080, port=80, ip=IPv4Address("10.80.0.5"))]
        nft.apply(w.ruleset(), w.state, netns=w.host)
        for net in (NAT, ISO):
            d = Dnsmasq(
                net, w.state / net.name, w.state / "run" / net.name, upstreams=[], netns=w.host
            )
            d.write_hosts(
                [
                    HostEntry(ipam.stable_mac("a1" + TAG, 0), "a1", IPv4Address("10.80.0.5")),
                    HostEntry(ipam.stable_mac("a2" + TAG, 0), "a2", IPv4Address("10.80.0.6")),
                    HostEntry(ipam.stable_mac("dh" + TAG, 0), "dh", ADDRESSES["dh"]),
                ]
                if net is NAT
                else []
            )
            d.start()
            w.dnsmasqs.append(d)
        for name in ("a1", "a2", "b1"):
            serve(w.instances[name], "0.0.0.0", 80, f"{name}:80".encode())
            serve(w.instances[name], "0.0.0.0", 22, f"{name}:22".encode())
        serve(w.outside, "0.0.0.0", 80, b"outside")
        yield w
    finally:
        teardown(w)


def test_ipam_sees_host_routes_and_allocates_around_them(world: World) -> None:
    routes = ipam.host_routes(world.host)
    assert IPv4Network("192.0.2.0/24") in routes and IPv4Network("10.80.0.0/24") in routes
    new = ipam.complete(NetworkConfig(name="third"), [NAT, ISO], netns=world.host)
    assert new.subnet == IPv4Network("10.80.2.0/24") and new.bridge == "vzbr2"


def test_same_network_ping_and_tcp_both_ways(world: World) -> None:
    a1, a2 = world.instances["a1"], world.instances["a2"]
    sh(a1, "busybox", "ping", "-c", "1", "-W", "2", "10.80.0.6")
    assert connect(a1, "10.80.0.6", 80) == b"a2:80"
    assert connect(a2, "10.80.0.5", 80) == b"a1:80"


def test_ensure_functions_adopt_instead_of_duplicating(world: World) -> None:
    before = links.list_owned(DAEMON, world.host)
    assert NAT.bridge and NAT.gateway
    links.ensure_bridge(
        NAT.bridge, IPv4Interface(f"{NAT.gateway}/24"), NAT.name, daemon=DAEMON, netns=world.host
    )
    add_again = links.link_name("v", "a1" + TAG, 0)
    links.ensure_veth(
        add_again,
        world.instances["a1"],
        bridge="vzbr0",
        mac=ipam.stable_mac("a1" + TAG, 0),
        network="nat",
        instance="a1",
        daemon=DAEMON,
        netns=world.host,
    )
    tap = links.link_name("t", "vm" + TAG, 0)
    for _ in range(2):
        links.ensure_tap(
            tap, bridge="vzbr0", network="nat", instance="vm", daemon=DAEMON, netns=world.host
        )
    fd = links.open_tap(tap, netns=world.host)
    os.close(fd)
    after = links.list_owned(DAEMON, world.host)
    assert sorted(x.name for x in after) == sorted([*(x.name for x in before), tap])
    assert {x.name: x.instance for x in after}[tap] == "vm"
    assert connect(world.instances["a2"], "10.80.0.5", 80) == b"a1:80"


def test_dhcp_gives_an_address_in_range(world: World, tmp_path: Path) -> None:
    script = tmp_path / "udhcpc.sh"
    out = tmp_path / "lease"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && echo "$ip" > {out}\nexit 0\n')
    script.chmod(0o755)
    sh(
        world.instances["dh"],
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-q",
        "-n",
        "-f",
        "-t",
        "5",
        "-T",
        "1",
        "-s",
        str(script),
    )
    got = IPv4Address(out.read_text().strip())
    assert NAT.dhcp_range and NAT.dhcp_range[0] <= got <= NAT.dhcp_range[1]
    assert "dh" in world.dnsmasqs[0].lease_path.read_text()


def test_dns_resolves_other_instances(world: World) -> None:
    for name in ("a2", "a2.vz"):
        res = sh(world.instances["a1"], "busybox", "nslookup", name, "10.80.0.1")
        assert "10.80.0.6" in res.stdout, res.stdout


def test_networks_do_not_reach_each_other(world: World) -> None:
    assert connect(world.instances["a1"], "10.80.1.5", 80) is None
    assert connect(world.instances["b1"], "10.80.0.5", 80) is None


def test_nat_reaches_outside_and_isolated_does_not(world: World) -> None:
    # The outside has no route back to 10.80/16: an answer proves the masquerade.
    assert connect(world.instances["a1"], str(OUTSIDE), 80) == b"outside"
    assert connect(world.instances["b1"], str(OUTSIDE), 80) is None
    assert connect(world.outside, "10.80.0.5", 80) is None  # nothing routed in


def test_port_forward_from_outside_and_host_loopback(world: World) -> None:
    assert connect(world.outside, str(HOST_UPLINK), 8080) == b"a1:80"
    assert connect(world.host, "127.0.0.1", 8080) == b"a1:80"
    assert connect(world.host, str(HOST_UPLINK), 8080) == b"a1:80"


def test_firewall_allow_list(world: World) -> None:
    fw = nft.InstanceFirewall(
        IPv4Address("10.80.0.6"),
        [FirewallRule.model_validate({"source": "10.80.0.5/32", "proto": "tcp", "port": 22})],
    )
    nft.apply(world.ruleset(fw), world.state, netns=world.host)
    try:
        a1 = world.instances["a1"]
        assert connect(a1, "10.80.0.6", 22) == b"a2:22"
        assert connect(a1, "10.80.0.6", 80) is None
        assert connect(world.instances["dh"], "10.80.0.6", 22, timeout=0.5) is None
        # Replies to a2's own connections still come back (established).
        assert connect(world.instances["a2"], "10.80.0.5", 80) == b"a1:80"
    finally:
        nft.apply(world.ruleset(), world.state, netns=world.host)
    assert connect(world.instances["a1"], "10.80.0.6", 80) == b"a2:80"


def test_dnsmasq_is_adopted_and_restarted(world: World) -> None:
    d = world.dnsmasqs[0]
    again = Dnsmasq(NAT, d.state_dir, d.run_dir, upstreams=[], netns=world.host)
    assert again.pid == d.pid is not None
    again.reload()
    pid = again.pid
    assert pid is not None
    os.kill(pid, 9)
    for _ in range(100):
        if not again.is_running():
            break
        threading.Event().wait(0.02)
    assert again.ensure() is True
    assert again.pid not in (None, pid)
    res = sh(world.instances["a1"], "busybox", "nslookup", "a2", "10.80.0.1")
    assert "10.80.0.6" in res.stdout


def _neighbour_mac(ns: str, ip: str) -> str | None:
    out = sh(ns, "ip", "-j", "neigh", "show", ip).stdout
    entries = [e for e in json.loads(out or "[]") if "lladdr" in e]
    return str(entries[0]["lladdr"]) if entries else None


def test_anti_spoofing_at_the_bridge(world: World) -> None:
    """An instance cannot take another's address or MAC, nor answer ARP for it: not even
    when the other is down, which is when taking its place in allow-lists would work."""
    a1, a2, dh = world.instances["a1"], world.instances["a2"], world.instances["dh"]
    a1_mac, dh_mac = ipam.stable_mac("a1" + TAG, 0), ipam.stable_mac("dh" + TAG, 0)
    fw = nft.InstanceFirewall(
        ADDRESSES["a2"],
        [FirewallRule.model_validate({"source": "10.80.0.5/32", "proto": "tcp", "port": 22})],
    )
    nft.apply(world.ruleset(fw), world.state, netns=world.host)
    try:
        assert connect(a1, "10.80.0.6", 22) == b"a2:22"
        sh(world.host, "busybox", "ping", "-c", "1", "-W", "2", "10.80.0.5")
        assert _neighbour_mac(world.host, "10.80.0.5") == a1_mac
        sh(a1, "ip", "link", "set", "eth0", "down")
        # dh takes a1's address: its packets, and its ARP answers for it, are dropped.
        sh(dh, "ip", "addr", "add", "10.80.0.5/24", "dev", "eth0")
        sh(dh, "busybox", "arping", "-U", "-c", "2", "-I", "eth0", "-s", "10.80.0.5", "10.80.0.5")
        assert connect(dh, "10.80.0.6", 22, timeout=2) is None
        assert _neighbour_mac(world.host, "10.80.0.5") != dh_mac
        # ... and with a1's MAC as well.
        sh(dh, "ip", "link", "set", "eth0", "address", a1_mac)
        assert connect(dh, "10.80.0.6", 22, timeout=2) is None
        assert sh(dh, "busybox", "ping", "-c", "1", "-W", "1", "10.80.0.1", check=False).returncode
    finally:
        sh(dh, "ip", "link", "set", "eth0", "address", dh_mac, check=False)
        sh(dh, "ip", "addr", "flush", "dev", "eth0", check=False)
        sh(a1, "ip", "link", "set", "eth0", "up", check=False)
        # The default route went with the link.
        sh(a1, "ip", "route", "replace", "default", "via", "10.80.0.1", check=False)
        nft.apply(world.ruleset(), world.state, netns=world.host)
    # Its own address still works, DHCP aside (test_dhcp_gives_an_address_in_range).
    sh(dh, "ip", "addr", "add", "10.80.0.20/24", "dev", "eth0")
    try:
        assert wait_for(lambda: connect(dh, "10.80.0.6", 80) == b"a2:80", 20)
    finally:
        sh(dh, "ip", "addr", "flush", "dev", "eth0")
    # a1 is back (neighbours re-learn it once their stale entries are probed).
    assert wait_for(lambda: connect(a2, "10.80.0.5", 80) == b"a1:80", 20)


def test_a_second_daemon_takes_nothing_of_the_first(world: World) -> None:
    """Another daemon in the same namespace: its tables come and go beside ours, and a
    bridge name of ours is refused to it, naming whose it is."""
    other = "feedf00d" if DAEMON != "feedf00d" else "deadbeef"
    lab = NetworkConfig.model_validate({"name": "lab", "subnet": "10.80.9.0/24", "bridge": "vzbr9"})
    ours = nft.listing(DAEMON, world.host)
    with pytest.raises(Conflict) as err:
        links.ensure_bridge(
            "vzbr0", IPv4Interface("10.80.0.1/24"), "nat", daemon=other, netns=world.host
        )
    assert f"another vzkit daemon (id {DAEMON}, state dir {world.state})" in err.value.message
    links.ensure_bridge(
        "vzbr9", IPv4Interface("10.80.9.1/24"), "lab", daemon=other, netns=world.host
    )
    try:
        nft.apply(nft.Ruleset(daemon=other, networks=[lab]), world.state / "o", netns=world.host)
        assert nft.listing(DAEMON, world.host) == ours
        assert not links.delete_link("vzbr0", world.host, daemon=other)
        assert [x.name for x in links.list_owned(other, world.host)] == ["vzbr9"]
        # Our instances still talk to each other and to the outside.
        a1, a2 = world.instances["a1"], world.instances["a2"]
        assert wait_for(lambda: connect(a2, "10.80.0.5", 80) == b"a1:80", 20)
        assert wait_for(lambda: connect(a1, str(OUTSIDE), 80) == b"outside", 20)
    finally:
        nft.remove(other, world.state / "o", netns=world.host)
        links.delete_link("vzbr9", world.host, daemon=other)
    assert nft.listing(DAEMON, world.host) == ours
    nft.apply(world.ruleset(), world.state, netns=world.host)


def test_raw_netlink_agrees_with_pyroute2(world: World) -> None:
    """Supervision's own netlink reads (network/_nl.py) against pyroute2's, in a namespace
    with bridges, enslaved veths and a TAP."""
    with entered(world.host), IPRoute() as ipr:
        want = {
            str(x.get_attr("IFLA_IFNAME")): (int(x["index"]), x.get_attr("IFLA_MASTER"))
            for x in ipr.get_links()
        }
    got = links.list_links(world.host)
    assert {n: (i.index, i.master) for n, i in got.items()} == want
    assert got[links.link_name("v", "a1" + TAG, 0)].master == got["vzbr0"].index
    before = nft.generation(world.host)
    nft.apply(world.ruleset(), world.state, netns=world.host)
    assert nft.generation(world.host) > before


def test_teardown_leaves_nothing(world: World) -> None:
    pids = [d.pid for d in world.dnsmasqs]
    nft.remove(DAEMON, world.state, netns=world.host)
    for d in world.dnsmasqs:
        d.stop()
    for link in links.list_owned(DAEMON, world.host):
        links.delete_link(link.name, netns=world.host, daemon=DAEMON)
    assert links.list_owned(DAEMON, world.host) == []
    out = sh(world.host, "ip", "-o", "link").stdout
    names = [line.split(": ")[1].split("@")[0] for line in out.splitlines()]
    assert sorted(names) == ["lo", "up0"], out
    assert "vzkit" not in nft.list_ruleset(world.host)
    # Exited: a zombie init has not reaped yet holds nothing any more.
    assert all(p is None or not alive(p) for p in pids)
    assert not (world.state / "ip_forward.orig").exists()
    teardown(world)
    assert not any(n.startswith(f"vzt{TAG}") for n in pr_netns.listnetns())
