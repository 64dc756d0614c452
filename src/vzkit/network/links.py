"""Bridges, veth pairs and TAP devices through netlink (pyroute2), never the `ip` command.

Every link vzkit makes has a name starting with ``vz``, an interface alias (IFLA_IFALIAS)
``vzkit@<daemon>:<network>`` (bridges) or ``vzkit@<daemon>:<network>:<instance>`` (NICs)
and the interface group (IFLA_GROUP) of its daemon. Several daemons can share a network
namespace (each with its own state dir), so a link is the daemon's only if it carries the
daemon's identity: :func:`list_owned` finds them after a restart so leaks can be removed,
and nothing here adopts, re-labels or deletes another daemon's link. The group is set in
the very message that creates a bridge or veth (the kernel ignores an alias there), so
even a link half-made by a crash is recognisable; the nft bridge table drops frames from
a port in the group that has no anti-spoofing rule.

Links of daemons from before identities carry ``vzkit:<network>[:<instance>]``: they are
reported as belonging to no known daemon and left alone, except by the daemon that proves
they are its own (:func:`claim`).

The ``ensure_*`` functions adopt what already exists, is right and is this daemon's, and
replace what is wrong, so calling them again after a restart makes no duplicates.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from vzkit.errors import Conflict, EngineError, HostUnsupported
from vzkit.network import _nl
from vzkit.network._netns import NetnsRef, entered, netns_path

__all__ = [
    "ALIAS_PREFIX",
    "LEGACY_PREFIX",
    "LinkInfo",
    "OwnedLink",
    "alias_for",
    "attach",
    "byte_counters",
    "claim",
    "delete_link",
    "ensure_bridge",
    "ensure_tap",
    "ensure_veth",
    "group_for",
    "link_exists",
    "link_name",
    "list_links",
    "list_owned",
    "list_vzkit",
    "open_tap",
    "reattach_taps",
]

ALIAS_PREFIX = "vzkit@"
LEGACY_PREFIX = "vzkit:"
NAME_PREFIX = "vz"

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_TUNSETOWNER = 0x400454CC
_TUNSETVNETHDRSZ = 0x400454D8
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
# What QEMU's virtio-net sets for any guest that negotiates mergeable receive buffers or
# virtio 1.0 (every Linux guest): struct virtio_net_hdr_mrg_rxbuf.
_QEMU_VNET_HDR_LEN = 12
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438


@dataclass(frozen=True)
class OwnedLink:
    name: str
    index: int
    kind: str  # "bridge", "veth", "tun" (TAP) or "" when the kernel does not say
    alias: str
    network: str | None
    instance: str | None
    # The daemon identity in the alias; None for a link of a daemon from before identities
    # or one half-made (no alias yet: then ``group`` tells whose it is).
    daemon: str | None = None
    group: int = 0


@dataclass(frozen=True)
class LinkInfo:
    """Any link of the namespace, as supervision needs it."""

    name: str
    index: int
    master: int | None
    up: bool


def group_for(daemon: str) -> int:
    """The daemon's interface group: its 32-bit identity (0 is every link's default)."""
    return int(daemon, 16) or 1


def link_name(kind: str, instance_uuid: str, nic: int | str) -> str:
    """A stable host-side name: ``vzt``/``vzv`` + 12 hex digits of (uuid, NIC) = 15 chars.

    ``nic`` is the NIC's index or its interface name inside the instance.
    """
    if kind not in ("t", "v"):
        raise ValueError("kind is 't' (TAP) or 'v' (veth)")
    digest = hashlib.sha256(f"{instance_uuid}/{nic}".encode()).hexdigest()[:12]
    return f"{NAME_PREFIX}{kind}{digest}"


def alias_for(daemon: str, network: str, instance: str | None = None) -> str:
    return f"{ALIAS_PREFIX}{daemon}:{network}" + (f":{instance}" if instance else "")


def _parse_alias(alias: str) -> tuple[str | None, str | None, str | None] | None:
    """(daemon, network, instance) of a vzkit alias, None if it is not one."""
    if alias.startswith(ALIAS_PREFIX):
        daemon, _, rest = alias[len(ALIAS_PREFIX) :].partition(":")
    elif alias.startswith(LEGACY_PREFIX):
        daemon, rest = "", alias[len(LEGACY_PREFIX) :]
    else:
        return None
    network, _, instance = rest.partition(":")
    return daemon or None, network or None, instance or None


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


def _owner(link: Any) -> tuple[str | None, int]:
    """The daemon named in a link's alias ("" for a pre-identity vzkit alias, None for
    none) and its interface group."""
    parsed = _parse_alias(str(link.get_attr("IFLA_IFALIAS") or ""))
    daemon = None if parsed is None else (parsed[0] or "")
    return daemon, int(link.get_attr("IFLA_GROUP") or 0)


def _is_ours(link: Any, daemon: str) -> bool:
    owner, group = _owner(link)
    return owner == daemon or (owner is None and group == group_for(daemon))


def _foreign(what: str, link: Any, daemon: str, netns: NetnsRef) -> Conflict:
    """The error for a link named like one of ours that is not ours."""
    owner, _ = _owner(link)
    if owner:
        from vzkit.network import nft  # only on this error path

        return Conflict(
            f"{what} exists and belongs to another vzkit daemon "
            f"({nft.describe_daemon(owner, netns)})",
            hint="give this one another name (vz network create NAME --bridge vzbrN), or run "
            "each daemon in a network namespace of its own; never delete another's links",
        )
    if owner == "":
        return Conflict(
            f"{what} exists and belongs to a vzkit daemon from before daemon identities",
            hint="if no vzd uses it any more, remove it (ip link delete "
            f"{link.get_attr('IFLA_IFNAME')}) and restart vzd; otherwise pick another name",
        )
    return Conflict(
        f"{what} exists and was not made by this vzkit daemon (id {daemon})",
        hint="give this one another name, or remove that interface if nothing uses it",
    )


def _netlink(what: str, exc: NetlinkError) -> EngineError:
    return EngineError(f"{what}: {os.strerror(exc.code)}", hint="see the daemon log")


def link_exists(name: str, netns: NetnsRef = None) -> bool:
    with _ipr(netns) as ipr:
        return _index(ipr, name) is not None


def ensure_bridge(
    name: str,
    address: IPv4Interface,
    network: str,
    *,
    daemon: str,
    netns: NetnsRef = None,
    mac: str | None = None,
) -> int:
    """Create (or adopt our own) bridge ``name`` with ``address`` and bring it up; returns
    its index. Conflict if the name is taken by anything that is not this daemon's bridge.

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
                if not _is_ours(link, daemon):
                    raise _foreign(f"bridge {name}", link, daemon, netns)
            else:
                ipr.link("add", ifname=name, kind="bridge", group=group_for(daemon))
                idx = _index(ipr, name)
                assert idx is not None
            ipr.link("set", index=idx, ifalias=alias_for(daemon, network))
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


def delete_link(name: str, netns: NetnsRef = None, *, daemon: str | None = None) -> bool:
    """Delete a link; returns False if it was already gone (deleting a veth end removes both).

    With ``daemon``, only a link of that daemon is deleted (False otherwise): a name can
    have passed to another daemon since this one made it.
    """
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return False
        try:
            if daemon is not None and not _is_ours(ipr.get_links(idx)[0], daemon):
                return False
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise _netlink(f"cannot delete {name}", exc) from exc
        return True


def _attach(ipr: Any, idx: int, bridge: str, daemon: str, alias: str, netns: NetnsRef) -> None:
    master = _index(ipr, bridge)
    if master is None:
        raise EngineError(
            f"bridge {bridge} does not exist",
            hint="vzd re-creates a vanished bridge within seconds: retry; or create the "
            "network first",
        )
    bridge_link = ipr.get_links(master)[0]
    if not _is_ours(bridge_link, daemon):
        raise _foreign(f"bridge {bridge}", bridge_link, daemon, netns)
    ipr.link("set", index=idx, master=master, ifalias=alias, group=group_for(daemon), state="up")


def attach(
    name: str, *, bridge: str, daemon: str, network: str, instance: str, netns: NetnsRef = None
) -> None:
    """Put this daemon's existing port ``name`` (back) on ``bridge`` and bring it up."""
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise EngineError(f"interface {name} does not exist")
        if not _is_ours(ipr.get_links(idx)[0], daemon):
            raise _foreign(f"interface {name}", ipr.get_links(idx)[0], daemon, netns)
        try:
            _attach(ipr, idx, bridge, daemon, alias_for(daemon, network, instance), netns)
        except NetlinkError as exc:
            raise _netlink(f"cannot attach {name} to {bridge}", exc) from exc


def claim(
    name: str, *, daemon: str, network: str, instance: str | None = None, netns: NetnsRef = None
) -> None:
    """Label a link as this daemon's: one from before daemon identities (the caller has
    proved it is ours: see NetworkManager's migration), or a TAP just made again around a
    running QEMU's file (:func:`reattach_taps`)."""
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is not None:
            ipr.link(
                "set",
                index=idx,
                ifalias=alias_for(daemon, network, instance),
                group=group_for(daemon),
            )


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
    daemon: str,
    peer_name: str = "eth0",
    address: IPv4Interface | None = None,
    gateway: IPv4Address | None = None,
    netns: NetnsRef = None,
) -> None:
    """A veth pair: ``host_name`` on ``bridge``, its peer ``peer_name`` inside ``target``.

    ``target`` is the instance's namespace (pid, /var/run/netns name or path). The peer gets
    ``mac``, is brought up with the target's loopback, and optionally gets ``address`` and a
    default route via ``gateway`` (static addressing; leave both unset for DHCP).
    An existing pair of this daemon whose peer is right is adopted; anything else of this
    daemon's is replaced, and another daemon's link of that name is a Conflict.
    """
    tpath = netns_path(target)
    alias = alias_for(daemon, network, instance)
    with _ipr(netns) as ipr:
        try:
            idx = _index(ipr, host_name)
            if idx is not None and not _is_ours(ipr.get_links(idx)[0], daemon):
                raise _foreign(f"interface {host_name}", ipr.get_links(idx)[0], daemon, netns)
            if idx is not None and _peer_ok(tpath, peer_name, mac):
                _attach(ipr, idx, bridge, daemon, alias, netns)
                return
            if idx is not None:
                ipr.link("del", index=idx)
            tmp = "vzp" + host_name[3:]
            group = group_for(daemon)
            ipr.link(
                "add",
                ifname=host_name,
                kind="veth",
                group=group,
                peer={"ifname": tmp, "group": group},
            )
            idx = _index(ipr, host_name)
            peer_idx = _index(ipr, tmp)
            assert idx is not None and peer_idx is not None
            fd = os.open(tpath, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("set", index=peer_idx, net_ns_fd=fd)
            finally:
                os.close(fd)
            _attach(ipr, idx, bridge, daemon, alias, netns)
        except NetlinkError as exc:
            raise _netlink(f"cannot set up veth {host_name}", exc) from exc
    _configure_peer(tpath, tmp, peer_name, mac, address, gateway)


def _configure_peer(
    tpath: Path,
    tmp: str,
    peer_name: str,
    mac: str,
    address: IPv4Interface | None,
    gateway: IPv4Address | None,
) -> None:
    with _ipr(tpath) as ipr:
        try:
            pidx = _index(ipr, tmp)
            if pidx is None:
                raise EngineError(f"veth peer {tmp} vanished from {tpath}")
            # Inside the instance the interface is the instance's: no daemon group there.
            ipr.link("set", index=pidx, ifname=peer_name, address=mac, group=0)
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
    daemon: str,
    owner: int | None = None,
    netns: NetnsRef = None,
) -> int:
    """A persistent TAP device ``name`` on ``bridge``, made by the daemon; returns its index.

    QEMU then opens it with ``-netdev tap,id=n0,ifname=NAME,script=no,downscript=no`` (it
    must run in the TAP's namespace to find it by name), or takes an fd from
    :func:`open_tap` with ``-netdev tap,id=n0,fd=N``. Persistent means the device outlives
    QEMU: a restarted VM gets the same TAP, and the daemon deletes it with the instance.
    The name derives from the instance's uuid, so an unlabelled TAP of that name is a
    half-made one of ours; one labelled by another daemon is a Conflict.
    """
    with entered(netns):
        with IPRoute() as ipr:
            idx = _index(ipr, name)
            if idx is not None:
                link = ipr.get_links(idx)[0]
                if _kind(link) != "tun":
                    raise Conflict(f"interface {name} exists and is not a TAP device")
                if _owner(link)[0] not in (None, daemon):
                    raise _foreign(f"interface {name}", link, daemon, netns)
        if idx is None or owner is not None:
            # Also for an existing TAP: the user QEMU runs as may have changed.
            fd = _tun_open(name, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, _TUNSETPERSIST, 1)
                if owner is not None:
                    fcntl.ioctl(fd, _TUNSETOWNER, owner)  # QEMU runs unprivileged
            finally:
                os.close(fd)
        with IPRoute() as ipr:
            idx = _index(ipr, name)
            assert idx is not None
            try:
                _attach(ipr, idx, bridge, daemon, alias_for(daemon, network, instance), netns)
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
        _tun_set_iff(fd, name, flags)
    except OSError as exc:
        os.close(fd)
        raise EngineError(f"TUNSETIFF {name}: {exc.strerror}") from exc
    return fd


def _tun_set_iff(fd: int, name: str, flags: int) -> None:
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))


def open_tap(name: str, netns: NetnsRef = None) -> int:
    """Open the persistent TAP ``name`` and return the fd, for QEMU's ``-netdev tap,fd=N``."""
    with entered(netns):
        return _tun_open(name, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)


_libc = ctypes.CDLL(None, use_errno=True)


def _detached_tun_fds(pid: int) -> list[int]:
    """The fds of ``pid`` on /dev/net/tun whose device is gone (``iff:`` is empty)."""
    out = []
    fds = Path(f"/proc/{pid}/fd")
    for entry in fds.iterdir():
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(entry) != "/dev/net/tun":
                continue
            info = (Path(f"/proc/{pid}/fdinfo") / entry.name).read_text()
            iff = next((ln for ln in info.splitlines() if ln.startswith("iff:")), None)
            if iff is not None and not iff[4:].strip():
                out.append(int(entry.name))
    return sorted(out)


def reattach_taps(pid: int, names: Sequence[str], netns: NetnsRef = None) -> bool:
    """Re-create the vanished TAPs ``names`` of the running QEMU ``pid`` around QEMU's own
    queues; returns False when that is not possible (QEMU keeps running without them).

    Deleting a TAP detaches the file QEMU holds but leaves it open, and TUNSETIFF on a
    detached file makes a new device and attaches that same file: so vzd takes a copy of
    QEMU's descriptor (pidfd_getfd) and calls TUNSETIFF on it. QEMU opened its TAPs in NIC
    order, so the detached descriptors, in fd order, map to the vanished TAPs in NIC order;
    any other count than one each is ambiguous and left alone. The new device has no
    offloads (the guest then gets plain, unsegmented frames, which is always valid) and
    QEMU's virtio-net header length.
    """
    detached = _detached_tun_fds(pid)
    if not names or len(detached) != len(names):
        return False
    pidfd = _libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        return False
    try:
        with entered(netns):
            for num, name in zip(detached, names, strict=True):
                fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, num, 0)
                if fd < 0:
                    return False
                try:
                    _tun_set_iff(fd, name, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
                    fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", _QEMU_VNET_HDR_LEN))
                    fcntl.ioctl(fd, _TUNSETPERSIST, 1)
                except OSError:
                    return False
                finally:
                    os.close(fd)
    finally:
        os.close(pidfd)
    return True


def list_vzkit(netns: NetnsRef = None) -> list[OwnedLink]:
    """Every link a vzkit daemon labelled (any daemon, pre-identity ones included), and
    unlabelled vz* bridges, veths and TAPs (half-made: their group tells whose)."""
    found: list[OwnedLink] = []
    with _ipr(netns) as ipr:
        for link in ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            alias = str(link.get_attr("IFLA_IFALIAS") or "")
            kind = _kind(link)
            group = int(link.get_attr("IFLA_GROUP") or 0)
            parsed = _parse_alias(alias)
            if parsed is not None:
                daemon, network, instance = parsed
            elif name.startswith(("vzbr", "vzt", "vzv", "vzp")) and kind in (
                "bridge",
                "veth",
                "tun",
            ):
                daemon = network = instance = None
            else:
                continue
            found.append(
                OwnedLink(name, int(link["index"]), kind, alias, network, instance, daemon, group)
            )
    return found


def list_owned(daemon: str, netns: NetnsRef = None) -> list[OwnedLink]:
    """This daemon's links: its identity in the alias, or (half-made) only its group."""
    group = group_for(daemon)
    return [
        link
        for link in list_vzkit(netns)
        if link.daemon == daemon or (not link.alias and link.group == group)
    ]


def list_links(netns: NetnsRef = None) -> dict[str, LinkInfo]:
    """Every link of the namespace by name, with its master and whether it is up (cheap:
    supervision asks every second)."""
    return {
        name: LinkInfo(name, index, master, up)
        for name, (index, master, up) in _nl.links(netns).items()
    }


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
