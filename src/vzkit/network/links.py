"""Bridges, veth pairs and TAP devices through netlink (pyroute2), never the `ip` command.

Every link vzkit makes has a name starting with ``vz`` and an interface alias
(IFLA_IFALIAS) ``vzkit:<network>`` (bridges) or ``vzkit:<network>:<instance>`` (NICs),
so :func:`list_owned` finds them after a daemon restart and leaks can be removed.
The ``ensure_*`` functions adopt what already exists and is right, and replace what is
wrong, so calling them again after a restart makes no duplicates.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from vzkit.errors import Conflict, EngineError, HostUnsupported
from vzkit.network._netns import NetnsRef, entered, netns_path

__all__ = [
    "ALIAS_PREFIX",
    "OwnedLink",
    "byte_counters",
    "delete_link",
    "ensure_bridge",
    "ensure_tap",
    "ensure_veth",
    "link_exists",
    "link_name",
    "list_owned",
    "open_tap",
]

ALIAS_PREFIX = "vzkit:"
NAME_PREFIX = "vz"

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


@dataclass(frozen=True)
class OwnedLink:
    name: str
    index: int
    kind: str  # "bridge", "veth", "tun" (TAP) or "" when the kernel does not say
    alias: str
    network: str | None
    instance: str | None


def link_name(kind: str, instance_uuid: str, nic: int | str) -> str:
    """A stable host-side name: ``vzt``/``vzv`` + 12 hex digits of (uuid, NIC) = 15 chars.

    ``nic`` is the NIC's index or its interface name inside the instance.
    """
    if kind not in ("t", "v"):
        raise ValueError("kind is 't' (TAP) or 'v' (veth)")
    digest = hashlib.sha256(f"{instance_uuid}/{nic}".encode()).hexdigest()[:12]
    return f"{NAME_PREFIX}{kind}{digest}"


def alias_for(network: str, instance: str | None = None) -> str:
    return f"{ALIAS_PREFIX}{network}" + (f":{instance}" if instance else "")


@contextmanager
def _ipr(netns: NetnsRef) -> Iterator[Any]:
    with entered(netns), IPRoute() as ipr:
        yield ipr


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def _netlink(what: str, exc: NetlinkError) -> EngineError:
    return EngineError(f"{what}: {os.strerror(exc.code)}", hint="see the daemon log")


def link_exists(name: str, netns: NetnsRef = None) -> bool:
    with _ipr(netns) as ipr:
        return _index(ipr, name) is not None


def ensure_bridge(
    name: str,
    address: IPv4Interface,
    network: str,
    netns: NetnsRef = None,
    mac: str | None = None,
) -> int:
    """Create (or adopt) bridge ``name`` with ``address`` and bring it up; returns its index.

    ``mac`` pins the bridge's MAC. Without it a bridge takes the lowest MAC of its ports, so
    a port coming or going (a container restarting with a new veth) changes the gateway's
    MAC under every instance's ARP cache, and they lose the gateway (DNS) for ~30 s.
    """
    with _ipr(netns) as ipr:
        try:
            idx = _index(ipr, name)
            if idx is not None:
                link = ipr.get_links(idx)[0]
                if _kind(link) != "bridge":
                    raise Conflict(
                        f"interface {name} exists and is not a bridge",
                        hint="give the network another bridge name",
                    )
            else:
                ipr.link("add", ifname=name, kind="bridge")
                idx = _index(ipr, name)
                assert idx is not None
            ipr.link("set", index=idx, ifalias=alias_for(network))
            if mac is not None and ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS") != mac:
                ipr.link("set", index=idx, address=mac)
            have = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in ipr.get_addr(family=2, index=idx)
            }
            if (str(address.ip), address.network.prefixlen) not in have:
                ipr.addr(
                    "add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen
                )
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise _netlink(f"cannot set up bridge {name}", exc) from exc
        return idx


def delete_link(name: str, netns: NetnsRef = None) -> bool:
    """Delete a link; returns False if it was already gone (deleting a veth end removes both)."""
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise _netlink(f"cannot delete {name}", exc) from exc
        return True


def _attach(ipr: Any, idx: int, bridge: str, alias: str) -> None:
    master = _index(ipr, bridge)
    if master is None:
        raise EngineError(f"bridge {bridge} does not exist", hint="create the network first")
    ipr.link("set", index=idx, master=master, ifalias=alias, state="up")


def _peer_ok(target: NetnsRef, peer: str, mac: str) -> bool:
    try:
        with _ipr(target) as ipr:
            idx = _index(ipr, peer)
            if idx is None:
                return False
            link = ipr.get_links(idx)[0]
            return bool(link.get_attr("IFLA_ADDRESS") == mac and _kind(link) == "veth")
    except Exception:
        return False


def ensure_veth(
    host_name: str,
    target: str | int | Path,
    *,
    bridge: str,
    mac: str,
    network: str,
    instance: str,
    peer_name: str = "eth0",
    address: IPv4Interface | None = None,
    gateway: IPv4Address | None = None,
    netns: NetnsRef = None,
) -> None:
    """A veth pair: ``host_name`` on ``bridge``, its peer ``peer_name`` inside ``target``.

    ``target`` is the instance's namespace (pid, /var/run/netns name or path). The peer gets
    ``mac``, is brought up with the target's loopback, and optionally gets ``address`` and a
    default route via ``gateway`` (static addressing; leave both unset for DHCP).
    An existing pair whose peer is right is adopted; anything else is replaced.
    """
    tpath = netns_path(target)
    alias = alias_for(network, instance)
    with _ipr(netns) as ipr:
        try:
            idx = _index(ipr, host_name)
            if idx is not None and _peer_ok(tpath, peer_name, mac):
                _attach(ipr, idx, bridge, alias)
                return
            if idx is not None:
                ipr.link("del", index=idx)
            tmp = "vzp" + host_name[3:]
            ipr.link("add", ifname=host_name, kind="veth", peer={"ifname": tmp})
            idx = _index(ipr, host_name)
            peer_idx = _index(ipr, tmp)
            assert idx is not None and peer_idx is not None
            fd = os.open(tpath, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("set", index=peer_idx, net_ns_fd=fd)
            finally:
                os.close(fd)
            _attach(ipr, idx, bridge, alias)
        except NetlinkError as exc:
            raise _netlink(f"cannot set up veth {host_name}", exc) from exc
    with _ipr(tpath) as ipr:
        try:
            pidx = _index(ipr, tmp)
            if pidx is None:
                raise EngineError(f"veth peer {tmp} vanished from {tpath}")
            ipr.link("set", index=pidx, ifname=peer_name, address=mac)
            ipr.link("set", index=pidx, state="up")
            lo = _index(ipr, "lo")
            if lo is not None:
                ipr.link("set", index=lo, state="up")
            if address is not None:
                ipr.addr(
                    "add", index=pidx, address=str(address.ip), prefixlen=address.network.prefixlen
                )
                if gateway is not None:
                    ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway))
        except NetlinkError as exc:
            raise _netlink(f"cannot configure {peer_name} in {tpath}", exc) from exc


def ensure_tap(
    name: str,
    *,
    bridge: str,
    network: str,
    instance: str,
    owner: int | None = None,
    netns: NetnsRef = None,
) -> int:
    """A persistent TAP device ``name`` on ``bridge``, made by the daemon; returns its index.

    QEMU then opens it with ``-netdev tap,id=n0,ifname=NAME,script=no,downscript=no`` (it
    must run in the TAP's namespace to find it by name), or takes an fd from
    :func:`open_tap` with ``-netdev tap,id=n0,fd=N``. Persistent means the device outlives
    QEMU: a restarted VM gets the same TAP, and the daemon deletes it with the instance.
    """
    with entered(netns):
        with IPRoute() as ipr:
            idx = _index(ipr, name)
            if idx is not None and _kind(ipr.get_links(idx)[0]) != "tun":
                raise Conflict(f"interface {name} exists and is not a TAP device")
        if idx is None or owner is not None:
            # Also for an existing TAP: the user QEMU runs as may have changed.
            fd = _tun_open(name, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, _TUNSETPERSIST, 1)
                if owner is not None:
                    fcntl.ioctl(fd, 0x400454CC, owner)  # TUNSETOWNER: QEMU runs unprivileged
            finally:
                os.close(fd)
        with IPRoute() as ipr:
            idx = _index(ipr, name)
            assert idx is not None
            try:
                _attach(ipr, idx, bridge, alias_for(network, instance))
            except NetlinkError as exc:
                raise _netlink(f"cannot attach {name} to {bridge}", exc) from exc
            return idx


def _tun_open(name: str, flags: int) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HostUnsupported(
            f"cannot open /dev/net/tun: {exc.strerror}", hint="load the tun module"
        ) from exc
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise EngineError(f"TUNSETIFF {name}: {exc.strerror}") from exc
    return fd


def open_tap(name: str, netns: NetnsRef = None) -> int:
    """Open the persistent TAP ``name`` and return the fd, for QEMU's ``-netdev tap,fd=N``."""
    with entered(netns):
        return _tun_open(name, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)


def list_owned(netns: NetnsRef = None) -> list[OwnedLink]:
    """Links vzkit made: alias ``vzkit:...`` (or, lacking one, a vz* veth/tap/bridge name)."""
    owned: list[OwnedLink] = []
    with _ipr(netns) as ipr:
        for link in ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            alias = str(link.get_attr("IFLA_IFALIAS") or "")
            kind = _kind(link)
            if alias.startswith(ALIAS_PREFIX):
                parts = alias[len(ALIAS_PREFIX) :].split(":", 1)
                network, instance = parts[0] or None, (parts[1] if len(parts) > 1 else None)
            elif name.startswith(("vzbr", "vzt", "vzv", "vzp")) and kind in (
                "bridge",
                "veth",
                "tun",
            ):
                # A half-made link (crash between create and alias): still ours to clean.
                network = instance = None
            else:
                continue
            owned.append(OwnedLink(name, int(link["index"]), kind, alias, network, instance))
    return owned


def byte_counters(names: list[str], netns: NetnsRef = None) -> tuple[int, int]:
    """Received and transmitted bytes summed over the links ``names`` (missing ones: 0)."""
    rx = tx = 0
    with _ipr(netns) as ipr:
        for name in names:
            idx = _index(ipr, name)
            if idx is None:
                continue
            stats = ipr.get_links(idx)[0].get_attr("IFLA_STATS64")
            if stats is not None:
                rx += int(stats["rx_bytes"])
                tx += int(stats["tx_bytes"])
    return rx, tx


def host_addresses(netns: NetnsRef = None) -> list[str]:
    """This host's unicast addresses (link-local left out), loopback last."""
    with _ipr(netns) as ipr:
        addrs = [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()]
    usable = [a for a in addrs if not a.is_link_local]
    return [str(a) for a in sorted(usable, key=lambda a: (a.is_loopback, a.version, a))]
