"""Network resource models: one strict model per resource, shared by API, CLI, SDK and daemon."""

from __future__ import annotations

from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Self

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from vzkit.api.base import Strict
from vzkit.api.bounds import NAME_PATTERN, NAME_RE, NAME_RULE, PORT_RANGE, anchored

__all__ = [
    "FirewallRule",
    "FirewallUpdate",
    "NetworkConfig",
    "NetworkUpdate",
    "NicConfig",
    "PortForward",
    "Proto",
]

# Linux interface names: at most 15 bytes (IFNAMSIZ - 1); we also keep them to characters
# that are safe in nft strings and sysctl paths (no '.', which sysctl reads as a separator).
# The *_PATTERN strings are what the API schema shows (JSON Schema, ECMAScript syntax); the
# validators check the same rules, with clearer errors than a pattern mismatch.
IFNAME_PATTERN = r"^[a-zA-Z0-9_-]{1,15}$"
IFNAME_RE = anchored(IFNAME_PATTERN)
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_LABEL_RE = anchored(f"^{_LABEL}$")
DOMAIN_PATTERN = rf"^{_LABEL}(\.{_LABEL})*$"
DOMAIN_MAX = 253  # bytes of a DNS name in text form, dots included
# What the API takes (either case, ':' or '-'); the model stores lowercase with ':'.
MAC_PATTERN = r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$"
_MAC_RE = anchored(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"invalid network name {value!r}: {NAME_RULE}")
    return value


def _check_domain(value: str) -> str:
    if len(value) > DOMAIN_MAX or not all(_LABEL_RE.match(label) for label in value.split(".")):
        raise ValueError(
            f"invalid DNS domain {value!r}: dot-separated lowercase labels, "
            f"at most {DOMAIN_MAX} characters"
        )
    return value


# Addresses a bridge and its instances cannot use: the kernel routes them specially.
_SPECIAL_RANGES = {
    IPv4Network("0.0.0.0/8"): "'this network'",
    IPv4Network("127.0.0.0/8"): "loopback",
    IPv4Network("169.254.0.0/16"): "link-local",
    IPv4Network("224.0.0.0/4"): "multicast",
    IPv4Network("240.0.0.0/4"): "reserved, and the broadcast address",
}


# A TCP or UDP port: a JSON integer, never "80" or true.
Port = Annotated[StrictInt, Field(ge=PORT_RANGE[0], le=PORT_RANGE[1])]


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class NetworkConfig(Strict):
    """A virtual network: a bridge, an IPv4 subnet, NAT unless isolated, DHCP and DNS.

    Optional fields are filled in by :func:`vzkit.network.ipam.complete` (subnet, bridge)
    or derived from the subnet here (gateway, DHCP range).
    """

    name: str = Field(json_schema_extra={"pattern": NAME_PATTERN})
    subnet: IPv4Network | None = Field(
        None, description="IPv4 subnet in CIDR form; default: a free /24 from 10.80.0.0/16"
    )
    gateway: IPv4Address | None = Field(None, description="Bridge address; default: first host")
    isolated: StrictBool = Field(False, description="No NAT and no forwarding to anything else")
    dhcp_range: tuple[IPv4Address, IPv4Address] | None = Field(
        None, description="First and last address DHCP hands out; default: .10 to .250 in a /24"
    )
    dns_domain: str = Field(
        "vz",
        description="Domain instances' names resolve under",
        json_schema_extra={"pattern": DOMAIN_PATTERN, "maxLength": DOMAIN_MAX},
    )
    bridge: str | None = Field(
        None,
        description="Bridge interface name; default: vzbr<N>",
        json_schema_extra={"pattern": IFNAME_PATTERN},
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _name(value)

    @field_validator("subnet")
    @classmethod
    def _subnet_size(cls, value: IPv4Network | None) -> IPv4Network | None:
        if value is not None and value.prefixlen > 29:
            raise ValueError(f"subnet {value} is too small: use a /29 or larger")
        for special, what in _SPECIAL_RANGES.items():
            if value is not None and value.overlaps(special):
                raise ValueError(
                    f"subnet {value} overlaps {special} ({what}): use a private range "
                    "such as 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
                )
        return value

    @field_validator("dns_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return _check_domain(value)

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, value: str | None) -> str | None:
        if value is not None and not IFNAME_RE.match(value):
            raise ValueError(
                f"invalid bridge name {value!r}: 1-15 characters of letters, digits, '-' or '_'"
            )
        return value

    @model_validator(mode="after")
    def _derive(self) -> Self:
        if self.subnet is None:
            if self.gateway is not None or self.dhcp_range is not None:
                raise ValueError("gateway and dhcp_range need an explicit subnet")
            return self
        net = self.subnet
        if self.gateway is None:
            self.gateway = net.network_address + 1
        elif self.gateway not in net or self.gateway in (
            net.network_address,
            net.broadcast_address,
        ):
            raise ValueError(f"gateway {self.gateway} is not a host address of {net}")
        if self.dhcp_range is None:
            self.dhcp_range = default_dhcp_range(net)
        else:
            start, end = self.dhcp_range
            hosts = (net.network_address, net.broadcast_address)
            if start not in net or end not in net or start in hosts or end in hosts:
                raise ValueError(f"dhcp_range {start}-{end} is not inside {net}'s host addresses")
            if start > end:
                raise ValueError(f"dhcp_range starts after it ends ({start} > {end})")
            if start <= self.gateway <= end:
                raise ValueError(f"dhcp_range {start}-{end} contains the gateway {self.gateway}")
        return self

    @property
    def resolved(self) -> bool:
        return self.subnet is not None and self.bridge is not None


def default_dhcp_range(net: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    """.10-.250 in a /24; proportionally the upper part of smaller or larger subnets."""
    first, last = net.network_address + 1, net.broadcast_address - 1
    size = net.num_addresses
    if size >= 256:
        return net.network_address + 10, net.broadcast_address - 5
    # Small subnets: leave the lower quarter (gateway, static addresses) out of the pool.
    return first + max(1, size // 4), last


class NetworkUpdate(Strict):
    """Request body of PATCH /1.0/networks/{name}: only the fields given change.

    The subnet and bridge are fixed for a network's life: instances hold addresses in it.
    """

    isolated: StrictBool | None = None
    dns_domain: str | None = Field(
        None, json_schema_extra={"pattern": DOMAIN_PATTERN, "maxLength": DOMAIN_MAX}
    )

    @field_validator("dns_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        return None if value is None else _check_domain(value)


class NicConfig(Strict):
    """An instance's interface on a network.

    What a user asks for is ``network`` and optionally ``ip``/``mac``; the daemon stores the
    resolved form (address, MAC and interface name filled in), which stays the instance's
    for its whole life so its address and MAC survive restarts.
    """

    network: str = Field(json_schema_extra={"pattern": NAME_PATTERN})
    ip: IPv4Address | None = Field(
        None, description="Static address; default: one leased from the network's DHCP range"
    )
    mac: str | None = Field(
        None,
        description="MAC address; default: stable per instance and NIC",
        json_schema_extra={"pattern": MAC_PATTERN},
    )
    name: str | None = Field(
        None,
        description="Interface name inside the instance; default: eth0, eth1, ...",
        json_schema_extra={"pattern": IFNAME_PATTERN},
    )

    @field_validator("network")
    @classmethod
    def _check_network(cls, value: str) -> str:
        return _name(value)

    @field_validator("name")
    @classmethod
    def _ifname(cls, value: str | None) -> str | None:
        if value is not None and (not IFNAME_RE.match(value) or value == "lo"):
            raise ValueError(
                f"invalid interface name {value!r}: 1-15 characters of letters, digits, "
                "'-' or '_' (and not lo)"
            )
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        mac = value.lower().replace("-", ":")
        if not _MAC_RE.match(mac):
            raise ValueError(f"invalid MAC address {value!r}: six hex bytes like 0a:b2:00:12:34:56")
        if int(mac[:2], 16) & 1:
            raise ValueError(f"MAC address {value!r} is multicast: the first byte must be even")
        return mac


class PortForward(Strict):
    """A host port forwarded to an instance's port (nft DNAT)."""

    host_port: Port
    port: Port = Field(description="Port inside the instance")
    proto: Proto = Proto.TCP
    ip: IPv4Address | None = Field(None, description="Instance address; the daemon fills it in")


class FirewallRule(Strict):
    """One entry of an instance's ingress allow-list; any list means: drop what is not listed."""

    source: IPv4Network = Field(IPv4Network("0.0.0.0/0"), description="Allowed source CIDR")
    proto: Proto | None = Field(None, description="tcp or udp; default: any protocol")
    port: Port | None = Field(None, description="Destination port (needs proto)")

    @model_validator(mode="after")
    def _port_needs_proto(self) -> Self:
        if self.port is not None and self.proto is None:
            raise ValueError("a firewall rule with a port needs proto tcp or udp")
        return self


class FirewallUpdate(Strict):
    """Request body of PUT /1.0/instances/{name}/firewall."""

    rules: list[FirewallRule] | None = Field(
        description="The whole allow-list; null lets everything in, [] drops all ingress"
    )
