"""Two netlink questions asked every second by supervision, answered without pyroute2.

pyroute2 decodes every attribute of every link (15 ms for a handful of links here), and its
nftables socket costs 5 ms to set up; the supervisor needs only names, masters and the UP
flag, and one number. A raw socket and a few struct calls answer both in well under a
millisecond.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

from vzkit.errors import EngineError
from vzkit.network._netns import NetnsRef, entered

_NETLINK_NETFILTER = 12
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RTM_NEWLINK, _RTM_GETLINK = 16, 18
_IFLA_IFNAME, _IFLA_MASTER = 3, 10
_NFT_GETGEN = (10 << 8) | 16  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN
_NFTA_GEN_ID = 1
_HDR = struct.Struct("=IHHII")  # struct nlmsghdr
_IFINFO = struct.Struct("=BxHiII")  # struct ifinfomsg
_ATTR = struct.Struct("=HH")  # struct nlattr


def _ask(
    netns: NetnsRef, protocol: int, msg_type: int, flags: int, body: bytes
) -> Iterator[tuple[int, memoryview]]:
    """Send one request and yield (type, payload) of every reply message until done."""
    with entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    with sock:
        sock.bind((0, 0))
        sock.send(_HDR.pack(_HDR.size + len(body), msg_type, _NLM_F_REQUEST | flags, 1, 0) + body)
        while True:
            data = memoryview(sock.recv(1 << 20))
            off = 0
            while off + _HDR.size <= len(data):
                length, kind, _, _, _ = _HDR.unpack_from(data, off)
                payload = data[off + _HDR.size : off + length]
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise EngineError(f"netlink request failed: {os.strerror(err)}")
                    return
                yield kind, payload
                if not flags & _NLM_F_DUMP:
                    return
                off += (length + 3) & ~3


def _attrs(payload: memoryview, start: int) -> Iterator[tuple[int, memoryview]]:
    off = start
    while off + _ATTR.size <= len(payload):
        length, kind = _ATTR.unpack_from(payload, off)
        if length < _ATTR.size:
            return
        yield kind & 0x3FFF, payload[off + _ATTR.size : off + length]
        off += (length + 3) & ~3


def links(netns: NetnsRef = None) -> dict[str, tuple[int, int | None, bool]]:
    """Every link of the namespace: name -> (index, master index or None, up)."""
    out = {}
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for kind, payload in _ask(netns, socket.NETLINK_ROUTE, _RTM_GETLINK, _NLM_F_DUMP, body):
        if kind != _RTM_NEWLINK:
            continue
        _, _, index, flags, _ = _IFINFO.unpack_from(payload)
        name, master = None, None
        for attr, value in _attrs(payload, _IFINFO.size):
            if attr == _IFLA_IFNAME:
                name = bytes(value).split(b"\0", 1)[0].decode()
            elif attr == _IFLA_MASTER:
                master = struct.unpack_from("=I", value)[0] or None
        if name is not None:
            out[name] = (index, master, bool(flags & 1))  # IFF_UP
    return out


def nft_generation(netns: NetnsRef = None) -> int:
    """The nftables ruleset generation of the namespace (NFT_MSG_GETGEN)."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # struct nfgenmsg
    for _, payload in _ask(netns, _NETLINK_NETFILTER, _NFT_GETGEN, 0, body):
        for attr, value in _attrs(payload, 4):
            if attr == _NFTA_GEN_ID:
                return int(struct.unpack_from(">I", value)[0])
    raise EngineError("the kernel did not say the nftables generation")
