"""Instances on networks, end to end: vzd runs in a namespace of the test's own (netns.py).

Nothing here sends a packet outside the test's namespaces: the "internet" is the
``world`` namespace behind the daemon namespace's default route.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import wait_for
from tests.integration.netns import (
    OUTSIDE,
    UPLINK,
    connect,
    dnsmasq_pids,
    in_ns,
    ping,
    serve,
    sh,
    vz_links,
)
from vzkit.errors import Conflict, InvalidConfig, NotFound, StateError
from vzkit.sdk.client import Client

pytestmark = pytest.mark.integration

CONTAINER = {"type": "container", "image": "minimal"}


def tcp_roundtrip(c: Client, server: str, client: str, target: str, port: int = 7000) -> str:
    """Listen in ``server``, connect from ``client``; what the server received."""
    code, out = sh(c, server, f"rm -f /tmp/got; nc -l -p {port} > /tmp/got &")
    assert code == 0, out
    code, out = sh(
        c,
        client,
        f"for i in 1 2 3 4 5; do echo from-{client} | nc -w 2 {target} {port} && "
        "exit 0; sleep 0.2; done; exit 1",
    )
    assert code == 0, out
    code, out = sh(
        c,
        server,
        "for i in 1 2 3 4 5 6 7 8 9 10; do [ -s /tmp/got ] && break; sleep 0.1; done; cat /tmp/got",
    )
    return out.strip()


def test_vm_and_container_reach_each_other_by_name(netd: Daemon) -> None:
    c = netd.client()
    ns = netd.netns
    assert ns
    # No network named: both land on vzbr0, which the first instance creates.
    r = netd.vz("launch", "minimal", "box", "--type", "container")
    assert r.returncode == 0, r.stderr
    r = netd.vz("launch", "minimal", "vm1")
    assert r.returncode == 0, r.stderr
    box, vm1 = c.get_instance("box"), c.get_instance("vm1")
    net = c.get_network("vzbr0")
    assert net.bridge == "vzbr0" and net.subnet and not net.isolated
    for inst in (box, vm1):
        nic = inst.nics[0]
        assert nic.network == "vzbr0" and nic.name == "eth0" and nic.ip in net.subnet
        assert nic.mac and nic.mac.startswith("0a:76:7a:")
    assert box.nics[0].ip != vm1.nics[0].ip

    # Names resolve through the network's dnsmasq, bare and under the domain.
    code, out = ping(c, "box", "vm1")
    assert code == 0 and str(vm1.nics[0].ip) in out, out
    code, out = ping(c, "vm1", "box.vz")
    assert code == 0 and str(box.nics[0].ip) in out, out
    # TCP both ways.
    assert tcp_roundtrip(c, "vm1", "box", "vm1") == "from-box"
    assert tcp_roundtrip(c, "box", "vm1", "box") == "from-vm1"
    # A guest running its own DHCP client gets the address vzkit gave it. (Not a container:
    # a DHCP client needs CAP_NET_RAW, which containers do not have; vzd sets their address.)
    code, out = sh(c, "vm1", "busybox udhcpc -i eth0 -n -q -f -s /bin/true 2>&1")
    assert code == 0 and f"lease of {vm1.nics[0].ip} obtained" in out, out
    # NAT: the outside world answers, though it has no route back to the bridge's subnet.
    code, out = ping(c, "box", OUTSIDE)
    assert code == 0, out

    # A running VM cannot take a new NIC: a clear error, nothing changed.
    with pytest.raises(StateError) as err:
        c.attach_network("vm1", "vzbr0")
    assert "stop it first" in str(err.value.hint)
    assert len(c.get_instance("vm1").nics) == 1

    # A daemon crash and restart: the same addresses, no duplicate links, still connected.
    before = vz_links(ns)
    netd.kill(signal.SIGKILL)
    netd.start()
    c = netd.client()
    assert vz_links(ns) == before
    assert c.get_instance("box").nics == box.nics
    code, out = ping(c, "box", "vm1")
    assert code == 0, out
    # dnsmasq dying is noticed and it is restarted, its reservations intact.
    for pid in dnsmasq_pids(netd):
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(dnsmasq_pids(netd)) == 1, 10), "dnsmasq was restarted"
    code, out = ping(c, "box", "vm1.vz")
    assert code == 0, out
    # A restarted container gets its address and name back.
    c.stop("box", force=True)
    c.start("box")
    code, out = ping(c, "vm1", "box")
    assert code == 0 and str(box.nics[0].ip) in out, out

    c.delete_instance("box", force=True)
    c.delete_instance("vm1", force=True)
    assert vz_links(ns) == ["vzbr0"], "only the network's bridge is left"
    c.delete_network("vzbr0")
    assert vz_links(ns) == []
    assert "vzkit" not in in_ns(ns, "nft", "list", "ruleset")
    assert dnsmasq_pids(netd) == []


def test_networks_nat_isolation_and_routing(netd: Daemon) -> None:
    c = netd.client()
    c.create_network({"name": "lab1", "subnet": "10.81.1.0/24"})
    c.create_network({"name": "lab2", "subnet": "10.81.2.0/24"})
    r = netd.vz("network", "create", "iso", "--subnet", "10.81.3.0/24", "--isolated")
    assert r.returncode == 0, r.stderr
    for name, nets in (("a", ["lab1"]), ("b", ["lab2"]), ("i", ["iso"]), ("m", ["lab1", "lab2"])):
        # b is a q35 VM: virtio-net-pci (vm1 above is a microvm: virtio-net-device).
        kind = {"type": "vm"} if name == "b" else {"type": "container"}
        c.create_instance({"name": name, **kind, "nics": [{"network": n} for n in nets]})
    a, b = (c.get_instance(n).nics[0].ip for n in ("a", "b"))
    m = c.get_instance("m")
    assert [n.name for n in m.nics] == ["eth0", "eth1"]

    # Two networks do not reach each other...
    assert ping(c, "a", str(b), tries=1)[0] != 0
    assert ping(c, "b", str(a), tries=1)[0] != 0
    # ...unless an instance is on both.
    assert ping(c, "m", str(a))[0] == 0
    assert ping(c, "m", str(b))[0] == 0
    # NAT networks reach out; the isolated one has no default route and nothing gets out.
    assert ping(c, "a", OUTSIDE)[0] == 0
    _, out = sh(c, "i", "ip route")
    assert "default" not in out, out
    assert ping(c, "i", OUTSIDE, tries=1)[0] != 0
    assert ping(c, "i", str(a), tries=1)[0] != 0
    # It still has its gateway for DNS.
    assert ping(c, "i", "10.81.3.1")[0] == 0

    # `network set`: isolate lab1 live, then open it again.
    r = netd.vz("network", "set", "lab1", "isolated=true")
    assert r.returncode == 0, r.stderr
    assert ping(c, "a", OUTSIDE, tries=1)[0] != 0
    c.update_network("lab1", isolated=False)
    assert ping(c, "a", OUTSIDE)[0] == 0
    r = netd.vz("network", "set", "lab1", "subnet=10.9.0.0/24")
    assert r.returncode == 2 and b"invalid setting" in r.stderr

    # A network in use cannot go; the list says how many use it (iso, lab1, lab2).
    with pytest.raises(Conflict) as err:
        c.delete_network("lab2")
    assert "b, m" in err.value.message
    r = netd.vz("network", "list")
    assert r.returncode == 0
    assert [ln.split()[-1] for ln in r.stdout.decode().splitlines()[1:]] == ["1", "2", "2"]


def test_attach_and_detach_running_container(netd: Daemon) -> None:
    c = netd.client()
    ns = netd.netns
    assert ns
    r = netd.vz("launch", "minimal", "solo", "--type", "container", "--network", "none")
    assert r.returncode == 0, r.stderr
    assert c.get_instance("solo").nics == []
    _code, out = sh(c, "solo", "ip -o link")
    assert "eth0" not in out

    c.create_network({"name": "lab", "subnet": "10.82.0.0/24"})
    r = netd.vz("network", "attach", "solo", "lab", "--ip", "10.82.0.77")
    assert r.returncode == 0, r.stderr
    assert b"eth0 on lab, 10.82.0.77" in r.stdout
    _, out = sh(c, "solo", "ip -4 -o addr show eth0")
    assert "10.82.0.77/24" in out, out
    assert ping(c, "solo", "10.82.0.1")[0] == 0
    r = netd.vz("port", "add", "solo", "8081:80")
    assert r.returncode == 0, r.stderr

    r = netd.vz("network", "detach", "solo", "lab")
    assert r.returncode == 0, r.stderr
    solo = c.get_instance("solo")
    assert solo.nics == [] and solo.ports == [], "forwards to the address went with it"
    _, out = sh(c, "solo", "ip -o link")
    assert "eth0" not in out
    assert vz_links(ns) == [str(c.get_network("lab").bridge)]
    with pytest.raises(NotFound):
        c.detach_network("solo", "lab")


def test_port_forwards_and_firewall(netd: Daemon) -> None:
    c = netd.client()
    ns, world = netd.netns, netd.world
    assert ns and world
    for name in ("web", "friend", "stranger"):
        c.create_instance({**CONTAINER, "name": name})
    serve(c, "web")
    web = c.get_instance("web")
    r = netd.vz("port", "add", "web", "8080:7000")
    assert r.returncode == 0, r.stderr
    # From the host's loopback, and from outside through the host's uplink address.
    assert connect(ns, "127.0.0.1", 8080) == b"hi-from-web\n"
    assert connect(world, UPLINK, 8080) == b"hi-from-web\n"
    r = netd.vz("port", "list", "--format", "json")
    assert json.loads(r.stdout) == [
        {
            "instance": "web",
            "host_port": 8080,
            "proto": "tcp",
            "ip": str(web.nics[0].ip),
            "port": 7000,
        }
    ]
    # Taken host ports and bad specs are refused.
    with pytest.raises(Conflict):
        c.add_port("friend", 8080, 22)
    r = netd.vz("port", "add", "web", "99999:80")
    assert r.returncode == 2 and b"host port" in r.stderr
    r = netd.vz("port", "add", "web", "8080")
    assert r.returncode == 2 and b"HOSTPORT:PORT" in r.stderr

    # Allow-list: only friend may reach web's port 7000.
    friend_ip = c.get_instance("friend").nics[0].ip
    r = netd.vz(
        "firewall", "add", "web", "--source", f"{friend_ip}/32", "--proto", "tcp", "--port", "7000"
    )
    assert r.returncode == 0, r.stderr
    target = str(web.nics[0].ip)
    code, out = sh(c, "friend", f"echo x | nc -w 2 {target} 7000")
    assert code == 0 and "hi-from-web" in out, out
    code, out = sh(c, "stranger", f"echo x | nc -w 2 {target} 7000")
    assert "hi-from-web" not in out
    assert ping(c, "friend", target, tries=1)[0] != 0, "ICMP is not on the list"
    r = netd.vz("firewall", "list", "web")
    assert str(friend_ip) in r.stdout.decode() and b"dropped" in r.stdout
    netd.vz("firewall", "open", "web")
    code, out = sh(c, "stranger", f"echo x | nc -w 2 {target} 7000")
    assert code == 0 and "hi-from-web" in out, out
    c.set_firewall("web", [])
    assert ping(c, "friend", target, tries=1)[0] != 0
    r = netd.vz("firewall", "remove", "web", "3")
    assert r.returncode == 1 and b"no firewall rule 3" in r.stderr

    c.remove_port("web", 8080)
    table = f"vzkit-{netd.settings.daemon_id}"
    assert "dport 8080" not in in_ns(ns, "nft", "list", "table", "inet", table)
    for name in ("web", "friend", "stranger"):
        c.delete_instance(name, force=True)
    c.delete_network("vzbr0")
    assert vz_links(ns) == [] and "vzkit" not in in_ns(ns, "nft", "list", "ruleset")


def test_bad_network_requests_leave_nothing(netd: Daemon) -> None:
    c = netd.client()
    ns = netd.netns
    assert ns
    c.create_network({"name": "lab", "subnet": "10.83.0.0/24"})
    c.create_instance({**CONTAINER, "name": "one", "nics": [{"network": "lab", "ip": "10.83.0.9"}]})
    links = vz_links(ns)
    bad = [
        ({"network": "lab", "ip": "10.83.0.9"}, Conflict, "already used"),
        ({"network": "lab", "ip": "10.99.0.5"}, InvalidConfig, "outside network"),
        ({"network": "lab", "ip": "10.83.0.1"}, InvalidConfig, "the gateway"),
        ({"network": "nope"}, NotFound, "network 'nope' not found"),
        ({"network": "lab", "mac": "01:00:00:00:00:01"}, InvalidConfig, "multicast"),
    ]
    for nic, exc, text in bad:
        with pytest.raises(exc) as err:
            c.create_instance({**CONTAINER, "name": "two", "nics": [nic]})
        assert text in err.value.message, err.value.message
    with pytest.raises(Conflict):
        c.create_instance(
            {
                **CONTAINER,
                "name": "two",
                "nics": [{"network": "lab"}],
                "ports": [{"host_port": 9000, "port": 1}, {"host_port": 9000, "port": 2}],
            }
        )
    r = netd.vz("launch", "minimal", "two", "--type", "container", "--network", "lab,ipv4=1")
    assert r.returncode == 2 and b"--network NAME[,ip=ADDR]" in r.stderr
    assert [i.name for i in c.list_instances()] == ["one"]
    assert vz_links(ns) == links
    hosts = (netd.settings.state_dir / "networks" / "lab" / "dhcp-hosts").read_text()
    assert hosts.count("\n") == 1, hosts
    proc = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htan"], capture_output=True)
    assert b"9000" not in proc.stdout
