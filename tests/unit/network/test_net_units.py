"""Unit tests of the network library: models, IPAM, MACs, nft and dnsmasq rendering."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from pydantic import ValidationError

from vzkit._proc import alive
from vzkit.api.bounds import NAME_PATTERN
from vzkit.api.networks import (
    IFNAME_PATTERN,
    MAC_PATTERN,
    FirewallRule,
    NetworkConfig,
    NicConfig,
    PortForward,
)
from vzkit.errors import Conflict, InvalidConfig
from vzkit.network import ipam, links, nft
from vzkit.network.dnsmasq import Dnsmasq, HostEntry, host_upstreams
from vzkit.network.links import link_name


def net(name: str, subnet: str, bridge: str, **kw: object) -> NetworkConfig:
    return NetworkConfig.model_validate({"name": name, "subnet": subnet, "bridge": bridge, **kw})


def test_defaults_derived_from_subnet() -> None:
    n = NetworkConfig.model_validate({"name": "default", "subnet": "10.80.3.0/24"})
    assert n.gateway == IPv4Address("10.80.3.1")
    assert n.dhcp_range == (IPv4Address("10.80.3.10"), IPv4Address("10.80.3.250"))
    assert n.dns_domain == "vz" and not n.isolated


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Bad_Name"},
        {"name": "a", "subnet": "10.80.0.5/24"},
        {"name": "a", "subnet": "10.80.0.0/30"},
        {"name": "a", "subnet": "10.80.0.0/24", "gateway": "10.81.0.1"},
        {"name": "a", "subnet": "10.80.0.0/24", "dhcp_range": ["10.80.0.1", "10.80.0.9"]},
        {"name": "a", "bridge": "a-very-long-bridge-name"},
        {"name": "a", "colour": "blue"},
    ],
)
def test_invalid_networks_rejected(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        NetworkConfig.model_validate(body)


def test_nic_and_rule_validation() -> None:
    assert NicConfig(network="a", mac="0A-76-7A-00-00-01").mac == "0a:76:7a:00:00:01"
    with pytest.raises(ValidationError):
        NicConfig(network="a", mac="01:00:00:00:00:00")  # multicast
    with pytest.raises(ValidationError):
        FirewallRule.model_validate({"port": 22})
    with pytest.raises(ValidationError):
        PortForward.model_validate({"host_port": 0, "port": 80})


def test_complete_allocates_avoiding_routes_and_networks() -> None:
    a = ipam.complete(NetworkConfig(name="a"), [], routes=[IPv4Network("10.80.0.0/23")])
    assert a.subnet == IPv4Network("10.80.2.0/24") and a.bridge == "vzbr1"
    assert a.gateway == IPv4Address("10.80.2.1")
    b = ipam.complete(NetworkConfig(name="b"), [a], routes=[IPv4Network("10.80.0.0/23")])
    assert b.subnet == IPv4Network("10.80.3.0/24") and b.bridge == "vzbr2"
    # vzbr0 is kept for the default network, which is named after its bridge.
    d = ipam.complete(NetworkConfig(name="vzbr0"), [a, b], routes=[])
    assert d.bridge == "vzbr0" and d.subnet == IPv4Network("10.80.0.0/24")
    # A network named like a bridge another network already has gets a free one.
    e = ipam.complete(NetworkConfig(name="vzbr2"), [a, b, d], routes=[])
    assert e.bridge == "vzbr3"


def test_overlaps_and_name_clashes_are_conflicts() -> None:
    a = net("a", "10.80.0.0/24", "vzbr0")
    with pytest.raises(Conflict, match="overlaps network 'a'") as exc:
        ipam.complete(NetworkConfig(name="b", subnet=IPv4Network("10.80.0.0/16")), [a], routes=[])
    assert exc.value.hint
    with pytest.raises(Conflict, match="already exists"):
        ipam.complete(NetworkConfig(name="a"), [a], routes=[])
    with pytest.raises(Conflict, match="host route"):
        ipam.complete(
            NetworkConfig(name="c", subnet=IPv4Network("192.168.1.0/24")),
            [],
            routes=[IPv4Network("192.168.0.0/16")],
        )


def test_static_ip_validation() -> None:
    a = net("a", "10.80.0.0/24", "vzbr0")
    ipam.check_static_ip(a, IPv4Address("10.80.0.5"), [IPv4Address("10.80.0.6")])
    for bad, err in [
        ("10.81.0.5", InvalidConfig),
        ("10.80.0.0", InvalidConfig),
        ("10.80.0.255", InvalidConfig),
        ("10.80.0.1", InvalidConfig),
        ("10.80.0.6", Conflict),
    ]:
        with pytest.raises(err):
            ipam.check_static_ip(a, IPv4Address(bad), [IPv4Address("10.80.0.6")])


def test_stable_mac_and_link_names() -> None:
    mac = ipam.stable_mac("6f1c-uuid", 0)
    assert mac == ipam.stable_mac("6f1c-uuid", 0) != ipam.stable_mac("6f1c-uuid", 1)
    assert mac.startswith("0a:76:7a:") and len(mac) == 17
    assert int(mac[:2], 16) & 0b11 == 0b10  # locally administered, unicast
    name = link_name("t", "6f1c-uuid", 3)
    assert name.startswith("vzt") and len(name) <= 15 and name == link_name("t", "6f1c-uuid", 3)


DAEMON = "0a1b2c3d"

GOLDEN_NAT = """\
table inet vzkit-0a1b2c3d {
\tcomment "vzkit daemon 0a1b2c3d; state dir /var/lib/vzkit"
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local tcp dport 8080 dnat ip to 10.80.0.5:80
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tfib daddr type local tcp dport 8080 dnat ip to 10.80.0.5:80
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "vzbr0" ip saddr 127.0.0.0/8 masquerade
\t\tiifname "vzbr0" oifname "vzbr0" ct status dnat masquerade
\t\tip saddr 10.80.0.0/24 ip daddr 224.0.0.0/24 return
\t\tip saddr 10.80.0.0/24 ip daddr 255.255.255.255 return
\t\tip saddr 10.80.0.0/24 ip daddr != 10.80.0.0/24 masquerade
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tip daddr 10.80.0.5 jump fw_10_80_0_5
\t\tct status dnat accept
\t\tiifname "vzbr0" oifname "vzbr0" accept
\t\toifname "vzbr0" ct state established,related accept
\t\toifname "vzbr0" drop
\t}
\tchain fw_10_80_0_5 {
\t\tct state established,related accept
\t\tip saddr 10.0.0.0/8 tcp dport 22 accept
\t\tmeta l4proto udp accept
\t\tdrop
\t}
}
table bridge vzkit-0a1b2c3d {
\tcomment "vzkit daemon 0a1b2c3d; state dir /var/lib/vzkit"
\tchain prerouting {
\t\ttype filter hook prerouting priority filter; policy accept;
\t\tiifname vmap { "vzt000000000001" : jump port_vzt000000000001 }
\t\tiifgroup 169552957 drop
\t}
\tchain port_vzt000000000001 {
\t\tether saddr != 0a:76:7a:00:00:05 drop
\t\tarp saddr ether 0a:76:7a:00:00:05 arp saddr ip { 0.0.0.0, 10.80.0.5 } accept
\t\tip saddr 10.80.0.5 accept
\t\tip saddr 0.0.0.0 udp sport 68 udp dport 67 accept
\t\tdrop
\t}
}
"""

GOLDEN_TWO = """\
table inet vzkit-0a1b2c3d {
\tcomment "vzkit daemon 0a1b2c3d"
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.80.0.0/24 ip daddr 224.0.0.0/24 return
\t\tip saddr 10.80.0.0/24 ip daddr 255.255.255.255 return
\t\tip saddr 10.80.0.0/24 ip daddr != 10.80.0.0/24 masquerade
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct status dnat accept
\t\tiifname "vzbr0" oifname "vzbr0" accept
\t\tiifname "vzbr1" oifname "vzbr1" accept
\t\tiifname { "vzbr0", "vzbr1" } oifname { "vzbr0", "vzbr1" } drop
\t\toifname "vzbr0" ct state established,related accept
\t\toifname "vzbr0" drop
\t\tiifname "vzbr1" drop
\t\toifname "vzbr1" drop
\t}
}
table bridge vzkit-0a1b2c3d {
\tcomment "vzkit daemon 0a1b2c3d"
\tchain prerouting {
\t\ttype filter hook prerouting priority filter; policy accept;
\t\tiifgroup 169552957 drop
\t}
}
"""


def test_nft_golden_nat_forward_firewall() -> None:
    rs = nft.Ruleset(
        daemon=DAEMON,
        state_dir="/var/lib/vzkit",
        ports=[nft.PortGuard("vzt000000000001", "0a:76:7a:00:00:05", IPv4Address("10.80.0.5"))],
        networks=[net("a", "10.80.0.0/24", "vzbr0")],
        forwards=[PortForward(host_port=8080, port=80, ip=IPv4Address("10.80.0.5"))],
        firewalls=[
            nft.InstanceFirewall(
                IPv4Address("10.80.0.5"),
                [
                    FirewallRule.model_validate(
                        {"source": "10.0.0.0/8", "proto": "tcp", "port": 22}
                    ),
                    FirewallRule.model_validate({"proto": "udp"}),
                ],
            )
        ],
    )
    assert nft.render(rs) == GOLDEN_NAT
    assert rs.needs_forwarding


def test_nft_golden_two_networks_one_isolated() -> None:
    rs = nft.Ruleset(
        daemon=DAEMON,
        networks=[
            net("a", "10.80.0.0/24", "vzbr0"),
            net("b", "10.80.1.0/24", "vzbr1", isolated=True),
        ],
    )
    assert nft.render(rs) == GOLDEN_TWO
    only_isolated = nft.Ruleset(
        daemon=DAEMON, networks=[net("b", "10.80.1.0/24", "vzbr1", isolated=True)]
    )
    assert not only_isolated.needs_forwarding


def test_nft_rejects_unresolved_input() -> None:
    with pytest.raises(InvalidConfig):
        nft.render(nft.Ruleset(daemon=DAEMON, networks=[NetworkConfig(name="a")]))
    with pytest.raises(InvalidConfig, match="no vzkit network"):
        nft.render(
            nft.Ruleset(
                daemon=DAEMON,
                networks=[net("a", "10.80.0.0/24", "vzbr0")],
                forwards=[PortForward(host_port=1, port=1, ip=IPv4Address("10.9.0.1"))],
            )
        )


def test_dnsmasq_config_and_hosts(tmp_path: Path) -> None:
    n = net("a", "10.80.0.0/24", "vzbr0", isolated=True)
    d = Dnsmasq(n, tmp_path / "state", tmp_path / "run", upstreams=["192.0.2.53"])
    conf = d.render_config().splitlines()
    for line in [
        "interface=vzbr0",
        "bind-interfaces",
        "except-interface=lo",
        f"pid-file={tmp_path}/run/dnsmasq.pid",
        f"dhcp-leasefile={tmp_path}/state/dnsmasq.leases",
        "dhcp-range=10.80.0.10,10.80.0.250,255.255.255.0,1h",
        "domain=vz",
        "local=/vz/",
        "no-resolv",
        "no-hosts",
        "server=192.0.2.53",
        "dhcp-option=option:router",
    ]:
        assert line in conf
    d.write_hosts(
        [
            HostEntry("0a:76:7a:00:00:01", "web", IPv4Address("10.80.0.5")),
            HostEntry("0a:76:7a:00:00:02", "db"),
        ]
    )
    assert (
        d.dhcp_hosts_path.read_text() == "0a:76:7a:00:00:01,10.80.0.5,web\n0a:76:7a:00:00:02,db\n"
    )
    assert d.hosts_path.read_text() == "10.80.0.5 web.vz web\n"
    assert not d.is_running()


def test_host_upstreams(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("# x\nnameserver 192.0.2.1\nnameserver ::1\nsearch example\n")
    assert host_upstreams(rc) == ["192.0.2.1"]
    assert host_upstreams(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "subnet",
    [
        "127.0.0.0/8",
        "127.1.0.0/24",
        "0.0.0.0/0",
        "0.0.0.0/8",
        "169.254.1.0/24",
        "224.0.0.0/24",
        "240.0.0.0/24",
        "255.255.255.248/29",
        "192.0.0.0/2",
    ],
)
def test_special_purpose_subnets_rejected(subnet: str) -> None:
    # The API took these (a bridge with 127.0.0.1/8 next to lo), found by the API fuzz test.
    with pytest.raises(ValidationError, match="overlaps"):
        NetworkConfig.model_validate({"name": "a", "subnet": subnet})


@pytest.mark.parametrize(
    "body",
    [
        {"name": "lab\n"},
        {"name": "a", "bridge": "br0\n"},
        {"name": "a", "dns_domain": "vz\n"},
        {"name": "a", "dns_domain": ".".join(["a" * 63] * 4)},  # 255 characters
    ],
)
def test_trailing_newlines_and_long_domains_rejected(body: dict[str, object]) -> None:
    # Python's $ matches before a final newline: "lab\n" went into dnsmasq's files.
    with pytest.raises(ValidationError):
        NetworkConfig.model_validate(body)


@pytest.mark.parametrize(
    "nic",
    [
        {"network": "a\n"},
        {"network": "a", "mac": "0a:76:7a:00:00:01\n"},
        {"network": "a", "name": "eth1\n"},
    ],
)
def test_nic_trailing_newlines_rejected(nic: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        NicConfig.model_validate(nic)


def test_schema_shows_the_rules() -> None:
    props = NetworkConfig.model_json_schema()["properties"]
    assert props["name"]["pattern"] == NAME_PATTERN
    assert props["bridge"]["pattern"] == IFNAME_PATTERN
    assert props["dns_domain"]["maxLength"] == 253
    nic = NicConfig.model_json_schema()["properties"]
    assert nic["mac"]["pattern"] == MAC_PATTERN and nic["network"]["pattern"] == NAME_PATTERN


def test_zombie_counts_as_gone() -> None:
    # A daemonized dnsmasq's parent is init, which may take seconds to reap it: stopping
    # a network waited for that (about 2 s per network here) though the zombie holds
    # nothing. Dnsmasq.stop waits on vzkit._proc.alive.
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not alive(child.pid)  # a zombie: not reaped yet
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid)


RULESET = """\
table ip other {
\tchain c {
\t\ttcp dport 9000 dnat to 1.2.3.4
\t}
}
table inet vzkit-0a1b2c3d {
\tcomment "vzkit daemon 0a1b2c3d; state dir /srv/a"
\tchain prerouting {
\t\tfib daddr type local tcp dport 8080 dnat ip to 10.80.0.5:80
\t}
}
table inet vzkit-feedf00d {
\tchain prerouting {
\t\tfib daddr type local udp dport 5353 dnat ip to 10.80.1.5:53
\t}
}
table inet vzkit {
\tchain forward {
\t\tiifname "vzbr0" oifname "vzbr0" accept
\t\toifname "vzbr7" drop
\t}
}
"""


def test_nft_reads_other_daemons_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft, "list_ruleset", lambda netns=None: RULESET)
    assert nft.listing("0a1b2c3d").startswith('table inet vzkit-0a1b2c3d {\n\tcomment "vzkit')
    assert nft.listing("12345678") == ""
    assert nft.describe_daemon("0a1b2c3d") == "id 0a1b2c3d, state dir /srv/a"
    assert nft.describe_daemon("feedf00d") == "id feedf00d"
    # Forwards of the other daemons (a pre-identity one included), not ours, not others'.
    assert nft.forwarded_elsewhere("0a1b2c3d") == {("udp", 5353)}
    assert nft.forwarded_elsewhere("feedf00d") == {("tcp", 8080)}
    assert nft.legacy_bridges() == {"vzbr0", "vzbr7"}
    monkeypatch.setattr(nft, "list_ruleset", lambda netns=None: "")
    assert nft.legacy_bridges() is None


def test_auto_bridge_names_avoid_existing_links() -> None:
    # Another daemon has vzbr1 and vzbr2 in this namespace: an auto name skips them...
    lab = ipam.complete(NetworkConfig(name="lab"), [], routes=[], links=["vzbr1", "vzbr2"])
    assert lab.bridge == "vzbr3"
    # ...but a network named like a bridge asks for that bridge (refused later, clearly).
    own = ipam.complete(NetworkConfig(name="vzbr1"), [], routes=[], links=["vzbr1"])
    assert own.bridge == "vzbr1"


def test_link_aliases_name_their_daemon() -> None:
    assert links.alias_for("0a1b2c3d", "lab", "web") == "vzkit@0a1b2c3d:lab:web"
    assert links._parse_alias("vzkit@0a1b2c3d:lab:web") == ("0a1b2c3d", "lab", "web")
    assert links._parse_alias("vzkit@0a1b2c3d:lab") == ("0a1b2c3d", "lab", None)
    assert links._parse_alias("vzkit:lab:web") == (None, "lab", "web")  # before identities
    assert links._parse_alias("uplink") is None
    assert links.group_for("0a1b2c3d") == 0x0A1B2C3D and links.group_for("00000000") == 1


def test_raw_link_dump_reads_loopback() -> None:
    # The host's other links come and go (other tests run); test_network_stack compares
    # whole dumps in a namespace of its own.
    lo = links.list_links()["lo"]
    assert lo.index == socket.if_nametoindex("lo") and lo.master is None and lo.up


@pytest.mark.skipif(os.geteuid() != 0, reason="nftables' netlink answers root only")
def test_ruleset_generation_reads() -> None:
    assert nft.generation() >= 0
