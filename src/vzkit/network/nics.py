"""Instances' interfaces: resolving what a user asked for, and the plan engines plug in.

A NIC request names a network and optionally an address, MAC and interface name. The
daemon resolves it once, when the NIC is added (:func:`resolve`): a free address from the
network's DHCP range unless one was asked for, a MAC derived from the instance's uuid, and
the first free ``ethN``. The resolved NIC is stored with the instance, so its address and MAC
never change. dnsmasq gets the same MAC -> address reservation (so a guest that runs its
own DHCP client gets that very address) and the name for DNS.

Engines receive a :class:`NetPlan`: host-side link names, bridges, addresses. Containers
are configured from the host through netlink (no tool needed in the image); VMs get
:meth:`NetPlan.guest_script` run by their agent right after it says hello, which is faster
than waiting for a DHCP exchange on every boot under TCG.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from vzkit.api.networks import NetworkConfig, NicConfig
from vzkit.errors import Conflict, InvalidConfig, NotFound, ResourceExhausted
from vzkit.network import ipam, links

__all__ = ["NetPlan", "NicPlan", "plan", "plug_veth", "resolve"]


@dataclass(frozen=True)
class NicPlan:
    network: str
    instance: str
    ifname: str  # inside the instance
    host_name: str  # the veth's host end or the TAP
    mac: str
    bridge: str
    address: IPv4Interface
    gateway: IPv4Address | None  # the default route, on the first NIC of a NAT network
    daemon: str  # the identity the host-side link carries (Settings.daemon_id)


@dataclass(frozen=True)
class NetPlan:
    nics: tuple[NicPlan, ...] = ()
    nameserver: IPv4Address | None = None
    search: str | None = None

    def resolv_conf(self) -> str:
        lines = []
        if self.nameserver is not None:
            lines.append(f"nameserver {self.nameserver}")
        if self.search:
            lines.append(f"search {self.search}")
        return "".join(f"{line}\n" for line in lines)

    def guest_script(self, hostname: str | None = None) -> str:
        """A POSIX sh script (busybox or iproute2) that configures the NICs by MAC.

        Interfaces are found by MAC, not by name, and renamed in two steps so that eth0 and
        eth1 swapping places cannot collide. A guest restored from another instance's
        memory still has that instance's MACs: then the interface is found by name and
        given its new MAC (and ``hostname`` its new name).
        """
        q = shlex.quote
        out = [
            "set -e",
            "byaddr() { for d in /sys/class/net/*; do "
            '[ "$(cat "$d/address")" = "$1" ] && { echo "${d##*/}"; return 0; }; done; '
            '[ -e "/sys/class/net/$2" ] && ip link set dev "$2" down && '
            'ip link set dev "$2" address "$1" && { echo "$2"; return 0; }; '
            'echo "no network interface with MAC $1" >&2; exit 1; }',
            "ip link set lo up",
        ]
        if hostname:
            out.append(f"hostname {q(hostname)}")
        for i, nic in enumerate(self.nics):
            out += [
                f"n=$(byaddr {q(nic.mac)} {q(nic.ifname)})",
                'ip link set "$n" down',
                f'ip link set "$n" name vzrn{i}',
            ]
        for i, nic in enumerate(self.nics):
            name = q(nic.ifname)
            out += [
                f"ip link set vzrn{i} name {name}",
                f"ip addr flush dev {name}",
                f"ip addr add {nic.address} dev {name}",
                f"ip link set {name} up",
            ]
            if nic.gateway is not None:
                out.append(f"ip route replace default via {nic.gateway} dev {name}")
        if self.nics:
            # A symlink (to a resolver stub) would send the write somewhere else.
            out += [
                "rm -f /etc/resolv.conf",
                f"printf %s {q(self.resolv_conf())} > /etc/resolv.conf",
            ]
        return "\n".join(out) + "\n"


def _free_address(net: NetworkConfig, used: set[IPv4Address]) -> IPv4Address:
    assert net.dhcp_range is not None
    start, end = net.dhcp_range
    ip = start
    while ip <= end:
        if ip not in used:
            return ip
        ip += 1
    raise ResourceExhausted(
        f"network {net.name!r} has no free address left ({start}-{end} are all taken)",
        hint="delete an instance on it, or create a network with a larger subnet",
    )


def _free_ifname(taken: set[str]) -> str:
    n = 0
    while f"eth{n}" in taken:
        n += 1
    return f"eth{n}"


def resolve(
    uuid: str,
    requested: Sequence[NicConfig],
    networks: dict[str, NetworkConfig],
    in_use: Iterable[NicConfig],
    existing: Sequence[NicConfig] = (),
) -> list[NicConfig]:
    """Resolve ``requested`` NICs for an instance that already has ``existing`` ones.

    ``in_use``: every other instance's resolved NICs (their addresses are taken).
    Returns the resolved new NICs only; raises NotFound/InvalidConfig/Conflict.
    """
    taken: dict[str, set[IPv4Address]] = {}
    # MACs must be unique per network: the bridge forwards by MAC.
    net_macs: set[tuple[str, str | None]] = set()
    for nic in [*in_use, *existing]:
        net_macs.add((nic.network, nic.mac))
        if nic.ip is not None:
            taken.setdefault(nic.network, set()).add(nic.ip)
    names = {n.name for n in existing if n.name}
    macs = {n.mac for n in existing if n.mac}
    out: list[NicConfig] = []
    for nic in requested:
        net = networks.get(nic.network)
        if net is None:
            raise NotFound(
                f"network {nic.network!r} not found",
                hint=f"create it first: vz network create {nic.network} (or see vz network list)",
            )
        used = taken.setdefault(net.name, set())
        if nic.ip is not None:
            ipam.check_static_ip(net, nic.ip, used)
            ip = nic.ip
        else:
            ip = _free_address(net, used)
        used.add(ip)
        name = nic.name or _free_ifname(names)
        if name in names:
            raise Conflict(
                f"the instance already has an interface named {name}",
                hint="leave the name out to get the next free ethN",
            )
        names.add(name)
        mac = nic.mac or ipam.stable_mac(uuid, name)
        if mac in macs or (net.name, mac) in net_macs:
            raise Conflict(
                f"MAC address {mac} is already used on network {net.name!r}",
                hint="pick another MAC, or leave it unset to get the instance's own stable one",
            )
        macs.add(mac)
        net_macs.add((net.name, mac))
        out.append(NicConfig(network=net.name, ip=ip, mac=mac, name=name))
    return out


def plan(
    instance: str,
    uuid: str,
    nics: Sequence[NicConfig],
    networks: dict[str, NetworkConfig],
    tap: bool,
    daemon: str,
) -> NetPlan:
    """What engines need to plug ``nics`` in: link names, bridges, addresses, routes."""
    out = []
    gateway_given = False
    first: NetworkConfig | None = None
    for nic in nics:
        net = networks.get(nic.network)
        if net is None or net.subnet is None or net.bridge is None:
            raise InvalidConfig(
                f"interface {nic.name} is on network {nic.network!r}, which no longer exists",
                hint=f"detach it: vz network detach {instance} {nic.network}",
            )
        assert nic.ip is not None and nic.mac is not None and nic.name is not None
        first = first or net
        gateway = None
        if not net.isolated and not gateway_given:
            gateway, gateway_given = net.gateway, True
        out.append(
            NicPlan(
                network=net.name,
                instance=instance,
                ifname=nic.name,
                host_name=links.link_name("t" if tap else "v", uuid, nic.name),
                mac=nic.mac,
                bridge=net.bridge,
                address=IPv4Interface(f"{nic.ip}/{net.subnet.prefixlen}"),
                gateway=gateway,
                daemon=daemon,
            )
        )
    if first is None:
        return NetPlan()
    return NetPlan(tuple(out), nameserver=first.gateway, search=first.dns_domain)


def plug_veth(pid: int, nic: NicPlan) -> None:
    """A veth pair from the network's bridge into the network namespace of ``pid`` (a
    container's init), addressed from the host: the image needs no network tools."""
    links.ensure_veth(
        nic.host_name,
        pid,
        bridge=nic.bridge,
        mac=nic.mac,
        network=nic.network,
        instance=nic.instance,
        daemon=nic.daemon,
        peer_name=nic.ifname,
        address=nic.address,
        gateway=nic.gateway,
    )
