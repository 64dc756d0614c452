"""Address management: subnet allocation, overlap checks, static addresses, stable MACs."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from vzkit.api.networks import NetworkConfig
from vzkit.errors import Conflict, InvalidConfig, ResourceExhausted
from vzkit.network._netns import NetnsRef, entered

__all__ = [
    "MAC_PREFIX",
    "POOL",
    "allocate_subnet",
    "check_overlap",
    "check_static_ip",
    "complete",
    "host_routes",
    "stable_mac",
]

POOL = IPv4Network("10.80.0.0/16")
# 0a:76:7a = 0x0a (locally administered, unicast: bit 1 set, bit 0 clear) followed by the
# ASCII of "vz". QEMU's 52:54:00 is also locally administered but shared by every QEMU user;
# ours tells at a glance which interfaces vzkit made, and can never clash with a vendor OUI.
MAC_PREFIX = "0a:76:7a"
_BRIDGE_NAME_RE = re.compile(r"^vzbr[0-9]{1,10}$")


def stable_mac(instance_uuid: str, nic_index: int | str) -> str:
    """The same MAC for the same instance and NIC, across restarts and hosts."""
    digest = hashlib.sha256(f"{instance_uuid}/{nic_index}".encode()).digest()
    return MAC_PREFIX + "".join(f":{b:02x}" for b in digest[:3])


def host_routes(netns: NetnsRef = None) -> list[IPv4Network]:
    """Destinations of the host's IPv4 routes (all tables), default routes excluded."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    nets: list[IPv4Network] = []
    with entered(netns), IPRoute() as ipr:
        for route in ipr.get_routes(family=2):
            dst = route.get_attr("RTA_DST")
            plen = route["dst_len"]
            if dst is None or plen == 0:
                continue
            net = IPv4Network(f"{dst}/{plen}", strict=False)
            # Local/broadcast host routes of our own bridges are not foreign networks.
            if net.prefixlen == 32 or net.is_loopback:
                continue
            nets.append(net)
    return nets


def check_overlap(
    config: NetworkConfig,
    others: Iterable[NetworkConfig],
    routes: Iterable[IPv4Network] = (),
) -> None:
    """Raise Conflict if the subnet, name or bridge clashes with another network or a route."""
    subnet = config.subnet
    for other in others:
        if other.name == config.name:
            raise Conflict(f"network {config.name!r} already exists", hint="choose another name")
        if config.bridge is not None and other.bridge == config.bridge:
            raise Conflict(
                f"bridge {config.bridge} is already used by network {other.name!r}",
                hint="leave bridge unset to get a free vzbr<N> name",
            )
        if subnet is not None and other.subnet is not None and subnet.overlaps(other.subnet):
            raise Conflict(
                f"subnet {subnet} overlaps network {other.name!r} ({other.subnet})",
                hint="choose a subnet that does not overlap, or leave it unset to get a free one",
            )
    if subnet is None:
        return
    for route in routes:
        if subnet.overlaps(route):
            raise Conflict(
                f"subnet {subnet} overlaps the host route to {route}",
                hint="choose another subnet: instances could not reach that network",
            )


def allocate_subnet(
    taken: Iterable[IPv4Network], pool: IPv4Network = POOL, prefixlen: int = 24
) -> IPv4Network:
    """The first /24 of the pool that overlaps nothing in ``taken``."""
    used = list(taken)
    for candidate in pool.subnets(new_prefix=prefixlen):
        if not any(candidate.overlaps(t) for t in used):
            return candidate
    raise ResourceExhausted(
        f"no free /{prefixlen} left in {pool}",
        hint="delete unused networks or give the new one an explicit subnet",
    )


def _free_bridge(name: str, others: Iterable[NetworkConfig], links: Iterable[str] = ()) -> str:
    """The network's own name if it is a free ``vzbr<N>``, else the first free ``vzbr<N>``
    from 1 on: vzbr0 stays for the default network (named vzbr0 as its bridge).

    ``links``: interfaces that exist already (another daemon's bridges): a name picked here
    avoids them, but a network named ``vzbr<N>`` asks for that very bridge, and the daemon
    refuses it clearly if another daemon has it.
    """
    others = list(others)
    used = {o.bridge for o in others} | {o.name for o in others}
    if _BRIDGE_NAME_RE.match(name) and name not in used:
        return name
    used |= set(links)
    n = 1
    while f"vzbr{n}" in used or f"vzbr{n}" == name:
        n += 1
    return f"vzbr{n}"


def complete(
    config: NetworkConfig,
    others: Iterable[NetworkConfig],
    routes: Iterable[IPv4Network] | None = None,
    netns: NetnsRef = None,
    links: Iterable[str] = (),
) -> NetworkConfig:
    """Fill in subnet and bridge, then check for clashes: the config the daemon stores.

    ``routes`` defaults to the host's routes, read from ``netns``. The routes of an existing
    vzkit bridge would always "overlap" its own network, so pass ``others`` completely.
    ``links``: the names of the interfaces that exist, which a bridge name picked here avoids.
    """
    others = list(others)
    if routes is None:
        routes = host_routes(netns)
    own = {o.subnet for o in others if o.subnet is not None}
    foreign = [r for r in routes if r not in own]
    update: dict[str, object] = {}
    if config.bridge is None:
        update["bridge"] = _free_bridge(config.name, others, links)
    if config.subnet is None:
        update["subnet"] = allocate_subnet([*own, *foreign])
    done = config
    if update:
        # Re-validate so gateway and DHCP range are derived from the new subnet.
        done = NetworkConfig.model_validate({**config.model_dump(), **update})
    check_overlap(done, others, foreign)
    return done


def check_static_ip(
    network: NetworkConfig, ip: IPv4Address, taken: Iterable[IPv4Address] = ()
) -> None:
    """Raise InvalidConfig/Conflict unless ``ip`` can be given to an instance on ``network``."""
    subnet = network.subnet
    if subnet is None:
        raise InvalidConfig(f"network {network.name!r} has no subnet yet")
    if ip not in subnet:
        raise InvalidConfig(
            f"address {ip} is outside network {network.name!r} ({subnet})",
            hint=f"pick an address in {subnet}",
        )
    reserved = {
        subnet.network_address: "the network address",
        subnet.broadcast_address: "the broadcast address",
        network.gateway: "the gateway",
    }
    if ip in reserved:
        raise InvalidConfig(
            f"address {ip} is {reserved[ip]} of network {network.name!r}",
            hint=f"pick a host address of {subnet} other than {network.gateway}",
        )
    if ip in set(taken):
        raise Conflict(
            f"address {ip} is already used on network {network.name!r}",
            hint="pick another address, or leave it unset to get one by DHCP",
        )
