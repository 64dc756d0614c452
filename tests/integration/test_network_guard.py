"""What guards a daemon's networks while they run: supervision puts back what vanishes from
outside (a bridge, a TAP or veth, the nft tables), and anti-spoofing keeps an instance
from passing as another. vzd runs in a network namespace of the test's own (netns.py)."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import time

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import wait_for
from tests.integration.netns import connect, in_ns, own_links, ping, serve, sh
from vzkit.network import nft
from vzkit.network._netns import entered
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

CONTAINER = {"type": "container", "image": "minimal"}
DEADLINE = 60.0  # supervision checks every second; a loaded 2-core machine is slow


def _link(ns: str, daemon: str, instance: str) -> str:
    """The host-side link (veth end or TAP) of ``instance``."""
    names = [n for n, a in own_links(ns, daemon).items() if a.endswith(f":{instance}")]
    assert len(names) == 1, names
    return names[0]


def _pings(c: Client, src: str, dst: str) -> bool:
    return ping(c, src, dst, tries=2)[0] == 0


def test_supervision_puts_back_what_vanished(netd: Daemon) -> None:
    c = netd.client()
    ns = netd.netns
    assert ns
    daemon = netd.settings.daemon_id
    for name in ("c1", "c2"):
        c.create_instance({**CONTAINER, "name": name})
    c.create_instance({"name": "vm1"})
    ip2, ipvm = (str(c.get_instance(n).nics[0].ip) for n in ("c2", "vm1"))
    serve(c, "c1", reply="from-c1")
    c.add_port("c1", 8080, 7000)
    links = own_links(ns, daemon)
    tables = nft.listing(daemon, ns)

    def all_well() -> bool:
        return (
            in_ns(ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
            and own_links(ns, daemon) == links
            and nft.listing(daemon, ns) == tables
            and _pings(c, "c1", ip2)
            and _pings(c, "c1", ipvm)
            and connect(ns, "127.0.0.1", 8080) == b"from-c1\n"
        )

    assert all_well()
    # The bridge goes: made again, with the instances' links back on it.
    in_ns(ns, "ip", "link", "delete", "vzbr0")
    assert wait_for(all_well, DEADLINE, interval=0.5), "bridge, TAP and veths are back"
    master = json.loads(in_ns(ns, "ip", "-j", "link", "show", "master", "vzbr0"))
    assert sorted(x["ifname"] for x in master) == sorted(n for n in links if n != "vzbr0")
    # The tables are flushed, deleted, or forwarding turned off: all re-applied.
    for cmd in (
        ["nft", "flush", "table", "inet", f"vzkit-{daemon}"],
        ["nft", "delete", "table", "bridge", f"vzkit-{daemon}"],
        ["sysctl", "-w", "net.ipv4.ip_forward=0"],
    ):
        in_ns(ns, *cmd)
        assert wait_for(all_well, DEADLINE, interval=0.5), f"back after {cmd}"
    # A running container's veth goes (with its peer): made again, addressed.
    in_ns(ns, "ip", "link", "delete", _link(ns, daemon, "c2"))
    assert wait_for(all_well, DEADLINE, interval=0.5), "c2's veth is back"
    # A running VM's TAP goes: made again around QEMU's own file, no restart.
    pid = c.get_instance("vm1").pid
    in_ns(ns, "ip", "link", "delete", _link(ns, daemon, "vm1"))
    assert wait_for(all_well, DEADLINE, interval=0.5), "vm1's TAP is back"
    assert c.get_instance("vm1").pid == pid


def _set_nic(c: Client, name: str, ip: str, mac: str, gateway: str) -> None:
    """Give eth0 of VM ``name`` another address and MAC, from inside (the agent is root)."""
    code, out = sh(
        c,
        name,
        "ip link set eth0 down && ip link set eth0 address "
        f"{mac} && ip link set eth0 up && ip addr flush dev eth0 && "
        f"ip addr add {ip}/24 dev eth0 && ip route replace default via {gateway}",
    )
    assert code == 0, out


def _nsenter(pid: int, *argv: str) -> None:
    """Run ``argv`` (from the host) in the network namespace of ``pid``."""
    subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], check=True, timeout=30)


def _arp_reply(pid: int, mac: str, ip: str, to_mac: str, to_ip: str) -> None:
    """Send "``ip`` is at ``mac``" to ``to_ip`` out of eth0 in the namespace of ``pid``."""
    with entered(pid):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind(("eth0", 0))
        src, dst = bytes.fromhex(mac.replace(":", "")), bytes.fromhex(to_mac.replace(":", ""))
        arp = struct.pack(
            "!HHBBH6s4s6s4s",
            1,  # Ethernet
            0x0800,  # IPv4
            6,
            4,
            2,  # reply
            src,
            ipaddress.IPv4Address(ip).packed,
            dst,
            ipaddress.IPv4Address(to_ip).packed,
        )
        sock.send(dst + src + b"\x08\x06" + arp)


def _spoofed_reaches(c: Client, name: str, web: str) -> bool:
    _, out = sh(
        c, name, f"for i in 1 2 3; do echo x | nc -w 2 {web} 7000 && exit 0; sleep 0.5; done"
    )
    return "from-web" in out


def test_instances_cannot_pass_as_another(netd: Daemon) -> None:
    """Only ``friend`` may reach web's port 7000. With friend stopped, neither a container
    nor a microVM that takes friend's address (and MAC) gets through, nor can they answer
    ARP for it; their own traffic, and DHCP, still pass."""
    c = netd.client()
    ns = netd.netns
    assert ns
    for name in ("web", "friend", "atk"):
        c.create_instance({**CONTAINER, "name": name})
    c.create_instance({"name": "vmatk"})
    net = c.get_network("vzbr0")
    gw = str(net.gateway)
    web = str(c.get_instance("web").nics[0].ip)
    friend = c.get_instance("friend").nics[0]
    fip, fmac = str(friend.ip), str(friend.mac)
    atk, vmatk = c.get_instance("atk").nics[0], c.get_instance("vmatk").nics[0]
    serve(c, "web", reply="from-web")
    c.set_firewall("web", [{"source": f"{fip}/32", "proto": "tcp", "port": 7000}])
    assert _spoofed_reaches(c, "friend", web)
    assert not _spoofed_reaches(c, "atk", web)
    c.stop("friend", force=True)

    # A container: its root has neither CAP_NET_RAW nor CAP_NET_ADMIN. The test plays a
    # tenant who has both (a container given them, or a kernel bug away from them) from the
    # host, inside the container's network namespace.
    pid = c.get_instance("atk").pid
    assert pid
    _nsenter(pid, "ip", "addr", "flush", "dev", "eth0")
    _nsenter(pid, "ip", "addr", "add", f"{fip}/24", "dev", "eth0")
    _nsenter(pid, "ip", "route", "replace", "default", "via", gw)
    assert not _spoofed_reaches(c, "atk", web), "friend's address from atk's port"
    assert not _pings(c, "atk", gw)
    _nsenter(pid, "ip", "link", "set", "eth0", "address", fmac)
    assert not _spoofed_reaches(c, "atk", web), "friend's address and MAC from atk's port"
    _nsenter(pid, "ip", "link", "set", "eth0", "address", str(atk.mac))
    _nsenter(pid, "ip", "addr", "flush", "dev", "eth0")
    _nsenter(pid, "ip", "addr", "add", f"{atk.ip}/24", "dev", "eth0")
    _nsenter(pid, "ip", "route", "replace", "default", "via", gw)
    assert wait_for(lambda: _pings(c, "atk", gw), 20), "its own address passes"
    # ARP, as root with CAP_NET_RAW could send it: "friend's address is at my MAC" never
    # reaches web (whose entry for friend, known a moment ago, stays).
    web_mac = str(c.get_instance("web").nics[0].mac)
    for _ in range(6):
        _arp_reply(pid, str(atk.mac), fip, web_mac, web)
        time.sleep(0.5)
    _, neigh = sh(c, "web", f"ip neigh show {fip}")
    assert str(atk.mac) not in neigh, neigh
    udhcpc = ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-s", "/bin/true"]
    dhcp = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", *udhcpc],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = dhcp.stdout + dhcp.stderr
    assert dhcp.returncode == 0 and f"lease of {atk.ip} obtained" in out, out

    # A micro-VM: the guest's root changes its own NIC.
    _set_nic(c, "vmatk", fip, str(vmatk.mac), gw)
    assert not _spoofed_reaches(c, "vmatk", web), "friend's address from the VM"
    _set_nic(c, "vmatk", fip, fmac, gw)
    assert not _spoofed_reaches(c, "vmatk", web), "friend's address and MAC from the VM"
    assert not _pings(c, "vmatk", gw)
    _set_nic(c, "vmatk", str(vmatk.ip), str(vmatk.mac), gw)
    assert wait_for(lambda: _pings(c, "vmatk", gw), 20), "its own address passes"
    code, out = sh(c, "vmatk", "udhcpc -i eth0 -n -q -f -t 5 -s /bin/true 2>&1")
    assert code == 0 and f"lease of {vmatk.ip} obtained" in out, out

    # The real friend is back and welcome.
    c.start("friend")
    assert wait_for(lambda: _spoofed_reaches(c, "friend", web), 20)
