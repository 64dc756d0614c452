"""The nftables rules of a vzkit daemon: its own two tables, rendered whole, swapped atomically.

Each daemon owns ``table inet vzkit-<id>`` and ``table bridge vzkit-<id>`` (``<id>``: its
identity, ``Settings.daemon_id``), each with a comment naming the daemon and its state dir,
and touches no other table: several daemons can share a network namespace.

The inet table (the inet family has had NAT hooks since Linux 5.2, so no separate ``ip``
NAT table is needed):

* ``prerouting``/``output`` (nat): port forwards, DNAT of ``fib daddr type local`` traffic,
  i.e. anything addressed to one of the host's own addresses. The ``output`` copy makes
  forwards work from the host itself, 127.0.0.1 included.
* ``postrouting`` (nat): masquerade of NAT networks to everything outside their subnet;
  masquerade of 127.0.0.0/8-sourced forwarded connections (a DNAT'd localhost connection
  keeps source 127.0.0.1, which the instance could not answer) and of hairpin
  connections (an instance reaching a sibling through a host port).
* ``forward`` (filter): per-instance allow-lists first (``ip daddr`` -> ``fw_*`` chain:
  established/related, the listed sources/ports, drop the rest), then port-forwarded
  connections pass, traffic inside one bridge passes, traffic between two of the daemon's
  bridges is dropped, isolated bridges drop all forwarding, NAT bridges take only replies
  from outside.

The bridge table is the anti-spoofing filter: at ``prerouting`` every instance port
(TAP or veth host end) jumps to a chain of its own that passes only frames with the NIC's
own source MAC, ARP that claims the NIC's own MAC and address (or 0.0.0.0: probes), IPv4
from the NIC's own address, and DHCP from 0.0.0.0; everything else from that port (another
instance's MAC or address, IPv6, VLAN tags) is dropped, so an instance cannot borrow a
neighbour's address and with it the neighbour's place in allow-lists. Frames from a port in
the daemon's interface group (``links.group_for``) that has no chain are dropped too.

Two daemons' tables compose: each base chain sees the packet in turn, an ``accept`` only
ends its own chain and a ``drop`` is final. So one daemon's bridges drop new connections
from another's like any outside traffic (``oifname <bridge> drop``), allow-lists hold
whichever table accepts first, and port forwards (DNAT) pass both ``forward`` chains by
``ct status dnat``. For NAT only the first chain that sets up a mapping for a connection
counts, and the two tables' forwards never share a host port (the manager checks the other
tables when a forward is added); masquerade matches only the daemon's own subnets, and
subnets never overlap because each daemon allocates around the host's routes, which include
the other daemon's bridges.

Intra-bridge traffic reaches the inet ``forward`` hook only through br_netfilter
(``net.bridge.bridge-nf-call-iptables=1``, the kernel default once br_netfilter is loaded;
built in here). The bridge family cannot do conntrack without nf_conntrack_bridge, which
this kernel lacks, so the allow-lists live in the inet table and :func:`apply` turns the
sysctl on when an allow-list exists.

Localhost forwards need ``net.ipv4.conf.<bridge>.route_localnet=1``: without it the kernel
refuses to route a 127.0.0.1-sourced packet out of the bridge (and to accept the reply),
whatever the masquerade. It is set on bridges that have forwards (Docker does the same).

``net.ipv4.ip_forward`` is turned on only while a NAT network or a port forward exists;
the value found before is remembered in ``<state_dir>/ip_forward.orig`` and restored by
:func:`apply` when none is left and by :func:`remove`, but only once no other vzkit daemon's
table is left in the namespace (until then the memo stays, and a later call restores it).

Host-originated traffic (the daemon's own health checks, the host's shell) does not cross
the ``forward`` hook and is not subject to allow-lists.

A daemon from before identities used one ``table inet vzkit``; :func:`apply` deletes it in
the same transaction when the manager has proved it was this daemon's (``drop_legacy``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from vzkit.api.networks import FirewallRule, NetworkConfig, PortForward
from vzkit.errors import EngineError, HostUnsupported, InvalidConfig
from vzkit.network import _bin, _nl
from vzkit.network._netns import NetnsRef, entered, read_sysctl, write_sysctl

__all__ = [
    "LEGACY_TABLE",
    "InstanceFirewall",
    "PortGuard",
    "Ruleset",
    "apply",
    "describe_daemon",
    "forwarded_elsewhere",
    "generation",
    "legacy_bridges",
    "list_ruleset",
    "listing",
    "remove",
    "render",
    "table_name",
]

TABLE_PREFIX = "vzkit-"
LEGACY_TABLE = "vzkit"  # ``inet vzkit``: the one table of daemons from before identities
_FAMILIES = ("inet", "bridge")
_MULTICAST = ("224.0.0.0/24", "255.255.255.255")
_COMMENT_MAX = 200  # the kernel keeps up to 256 bytes of user data per table


def table_name(daemon: str) -> str:
    return TABLE_PREFIX + daemon


@dataclass(frozen=True)
class InstanceFirewall:
    """An instance's ingress allow-list, keyed by its address."""

    ip: IPv4Address
    rules: Sequence[FirewallRule]


@dataclass(frozen=True)
class PortGuard:
    """An instance NIC's host-side port (TAP or veth end) and what may come out of it."""

    port: str
    mac: str
    ip: IPv4Address


@dataclass(frozen=True)
class Ruleset:
    """The desired state: every network, port forward, allow-list and port of a daemon."""

    daemon: str
    networks: Sequence[NetworkConfig] = ()
    forwards: Sequence[PortForward] = ()
    firewalls: Sequence[InstanceFirewall] = field(default_factory=tuple)
    ports: Sequence[PortGuard] = ()
    # Shown in the tables' comment, so another daemon can say whose a name is.
    state_dir: str = ""

    @property
    def needs_forwarding(self) -> bool:
        return bool(self.forwards) or any(not n.isolated for n in self.networks)


def _q(name: str) -> str:
    return f'"{name}"'


def _set(names: Iterable[str]) -> str:
    return "{ " + ", ".join(_q(n) for n in names) + " }"


def _resolved(networks: Sequence[NetworkConfig]) -> list[tuple[NetworkConfig, str]]:
    out = []
    for net in networks:
        if net.subnet is None or net.bridge is None:
            raise InvalidConfig(
                f"network {net.name!r} has no subnet or bridge yet",
                hint="pass it through ipam.complete() first",
            )
        out.append((net, net.bridge))
    return out


def _fw_chain(ip: IPv4Address) -> str:
    return "fw_" + str(ip).replace(".", "_")


def _rule_text(rule: FirewallRule) -> str:
    parts = []
    if rule.source.prefixlen:
        parts.append(f"ip saddr {rule.source}")
    if rule.proto is not None:
        parts.append(
            f"{rule.proto.value} dport {rule.port}"
            if rule.port is not None
            else f"meta l4proto {rule.proto.value}"
        )
    return " ".join([*parts, "accept"])


class _Table:
    def __init__(self, family: str, rs: Ruleset) -> None:
        self.lines = [f"table {family} {table_name(rs.daemon)} {{"]
        label = f"vzkit daemon {rs.daemon}" + (
            f"; state dir {rs.state_dir}" if rs.state_dir else ""
        )
        self.lines.append(f"\tcomment {_q(label.replace(chr(34), chr(39))[:_COMMENT_MAX])}")

    def chain(self, name: str, hook: str | None, rules: list[str]) -> None:
        self.lines.append(f"\tchain {name} {{")
        if hook:
            self.lines.append(f"\t\t{hook}")
        self.lines.extend(f"\t\t{r}" for r in rules)
        self.lines.append("\t}")

    def text(self) -> str:
        return "\n".join([*self.lines, "}"]) + "\n"


def render(rs: Ruleset) -> str:
    """The daemon's ``table inet vzkit-<id>`` and ``table bridge vzkit-<id>`` for ``rs``
    (nft syntax, deterministic)."""
    return _render_inet(rs) + _render_bridge(rs)


def _render_inet(rs: Ruleset) -> str:
    nets = _resolved(rs.networks)
    bridges = [b for _, b in nets]
    fwd_bridges = []
    dnat = []
    for pf in rs.forwards:
        if pf.ip is None:
            raise InvalidConfig(f"port forward {pf.host_port}/{pf.proto} has no instance address")
        owner = next((b for n, b in nets if n.subnet is not None and pf.ip in n.subnet), None)
        if owner is None:
            raise InvalidConfig(f"port forward target {pf.ip} is on no vzkit network")
        if owner not in fwd_bridges:
            fwd_bridges.append(owner)
        p = pf.proto.value
        dnat.append(f"fib daddr type local {p} dport {pf.host_port} dnat ip to {pf.ip}:{pf.port}")

    t = _Table("inet", rs)
    t.chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", dnat)
    t.chain("output", "type nat hook output priority -100; policy accept;", dnat)

    post = []
    for b in fwd_bridges:
        post.append(f"oifname {_q(b)} ip saddr 127.0.0.0/8 masquerade")
        post.append(f"iifname {_q(b)} oifname {_q(b)} ct status dnat masquerade")
    for net, _b in nets:
        if net.isolated:
            continue
        s = net.subnet
        post.extend(f"ip saddr {s} ip daddr {m} return" for m in _MULTICAST)
        post.append(f"ip saddr {s} ip daddr != {s} masquerade")
    t.chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;", post)

    fwd = [f"ip daddr {f.ip} jump {_fw_chain(f.ip)}" for f in rs.firewalls]
    if nets:
        fwd.append("ct status dnat accept")
        fwd.extend(f"iifname {_q(b)} oifname {_q(b)} accept" for b in bridges)
        if len(bridges) > 1:
            fwd.append(f"iifname {_set(bridges)} oifname {_set(bridges)} drop")
        for net, b in nets:
            if net.isolated:
                fwd += [f"iifname {_q(b)} drop", f"oifname {_q(b)} drop"]
            else:
                fwd += [
                    f"oifname {_q(b)} ct state established,related accept",
                    f"oifname {_q(b)} drop",
                ]
    t.chain("forward", "type filter hook forward priority filter; policy accept;", fwd)

    for f in rs.firewalls:
        rules = ["ct state established,related accept", *(_rule_text(r) for r in f.rules), "drop"]
        t.chain(_fw_chain(f.ip), None, rules)
    return t.text()


def _render_bridge(rs: Ruleset) -> str:
    from vzkit.network.links import group_for  # links imports this module on error paths

    t = _Table("bridge", rs)
    pre = []
    if rs.ports:
        jumps = ", ".join(f"{_q(p.port)} : jump port_{p.port}" for p in rs.ports)
        pre.append(f"iifname vmap {{ {jumps} }}")
    # A port of ours without a chain (one being plugged before the next sync): nothing yet.
    pre.append(f"iifgroup {group_for(rs.daemon)} drop")
    t.chain("prerouting", "type filter hook prerouting priority filter; policy accept;", pre)
    for p in rs.ports:
        t.chain(
            f"port_{p.port}",
            None,
            [
                f"ether saddr != {p.mac} drop",
                f"arp saddr ether {p.mac} arp saddr ip {{ 0.0.0.0, {p.ip} }} accept",
                f"ip saddr {p.ip} accept",
                # A DHCP client asks before it has an address.
                "ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
                "drop",
            ],
        )
    return t.text()


def _run_nft(args: list[str], netns: NetnsRef, script: str | None = None) -> str:
    nft = _bin.find("nft")
    with entered(netns):
        proc = subprocess.run(
            [nft, *args], input=script, text=True, capture_output=True, check=False
        )
    if proc.returncode != 0:
        raise EngineError(
            f"nft {' '.join(args)} failed: {proc.stderr.strip()}",
            hint="is the nftables kernel support (nf_tables, nft_nat) present?",
        )
    return proc.stdout


def _nft(script: str, netns: NetnsRef) -> None:
    try:
        _run_nft(["-f", "-"], netns, script)
    except EngineError as exc:
        raise EngineError(
            f"nft rejected vzkit's ruleset: {exc.message.split(': ', 1)[-1]}", hint=exc.hint
        ) from exc


def _reset(daemon: str) -> str:
    # Declaring a table first makes the delete succeed whether or not it exists; the whole
    # script is one nft transaction, so the old rules stay until the new ones are in.
    return "".join(
        f"table {f} {table_name(daemon)} {{}}\ndelete table {f} {table_name(daemon)}\n"
        for f in _FAMILIES
    )


_DROP_LEGACY = f"table inet {LEGACY_TABLE} {{}}\ndelete table inet {LEGACY_TABLE}\n"


def apply(
    rs: Ruleset, state_dir: Path, netns: NetnsRef = None, *, drop_legacy: bool = False
) -> None:
    """Make the kernel's tables of daemon ``rs.daemon`` exactly ``rs``, and the sysctls it
    needs. ``drop_legacy``: also delete ``inet vzkit``, proved to be this daemon's own."""
    _nft(_reset(rs.daemon) + render(rs) + (_DROP_LEGACY if drop_legacy else ""), netns)
    memo = state_dir / "ip_forward.orig"
    if rs.needs_forwarding:
        old = write_sysctl("net.ipv4.ip_forward", "1", netns)
        if old is not None and old != "1" and not memo.exists():
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(old + "\n")
    else:
        _restore_forwarding(rs.daemon, memo, netns)
    for net in rs.networks:
        if net.bridge and any(pf.ip in net.subnet for pf in rs.forwards if pf.ip and net.subnet):
            write_sysctl(f"net.ipv4.conf.{net.bridge}.route_localnet", "1", netns)
    if rs.firewalls and read_sysctl("net.bridge.bridge-nf-call-iptables", netns) == "0":
        write_sysctl("net.bridge.bridge-nf-call-iptables", "1", netns)


def _tables(netns: NetnsRef) -> list[tuple[str, str]]:
    out = _run_nft(["list", "tables"], netns)
    return [(f[1], f[2]) for f in (line.split() for line in out.splitlines()) if len(f) == 3]


def _restore_forwarding(daemon: str, memo: Path, netns: NetnsRef) -> None:
    if not memo.exists():
        return
    others = [
        name
        for family, name in _tables(netns)
        if family == "inet"
        and (name == LEGACY_TABLE or name.startswith(TABLE_PREFIX))
        and name != table_name(daemon)
    ]
    if others:
        return  # another daemon may route through it; the memo waits for a later call
    write_sysctl("net.ipv4.ip_forward", memo.read_text().strip(), netns)
    memo.unlink()


def remove(
    daemon: str, state_dir: Path, netns: NetnsRef = None, *, drop_legacy: bool = False
) -> None:
    """Delete the daemon's tables (fine if absent) and restore ip_forward; nothing else is
    touched (``drop_legacy``: as in :func:`apply`)."""
    _nft(_reset(daemon) + (_DROP_LEGACY if drop_legacy else ""), netns)
    _restore_forwarding(daemon, state_dir / "ip_forward.orig", netns)


def list_ruleset(netns: NetnsRef = None) -> str:
    """The whole ruleset of the namespace (all tables), for checks and diagnostics."""
    return _run_nft(["list", "ruleset"], netns)


def _blocks(ruleset: str) -> dict[tuple[str, str], str]:
    """``nft list ruleset`` split into its tables: (family, name) -> the table's text."""
    out: dict[tuple[str, str], str] = {}
    current: list[str] = []
    key: tuple[str, str] | None = None
    for line in ruleset.splitlines():
        if key is None and line.startswith("table "):
            f = line.split()
            key, current = (f[1], f[2]), [line]
        elif key is not None:
            current.append(line)
            if line == "}":
                out[key] = "\n".join(current) + "\n"
                key = None
    return out


def generation(netns: NetnsRef = None) -> int:
    """The namespace's ruleset generation: the kernel counts every nft transaction (anyone's),
    so an unchanged number means no table changed, for the price of one netlink message
    instead of an ``nft`` process."""
    return _nl.nft_generation(netns)


def listing(daemon: str, netns: NetnsRef = None) -> str:
    """The daemon's tables as the kernel has them now ("" for none): compared with the
    listing right after :func:`apply`, it shows whether anyone changed them since."""
    blocks = _blocks(list_ruleset(netns))
    return "".join(blocks.get((f, table_name(daemon)), "") for f in _FAMILIES)


def describe_daemon(daemon: str, netns: NetnsRef = None) -> str:
    """ "id X, state dir Y" from the daemon's table comment (just the id if it has none)."""
    try:
        text = _blocks(list_ruleset(netns)).get(("inet", table_name(daemon)), "")
    except EngineError:
        text = ""
    m = re.search(r"state dir (.*)\"", text)
    return f"id {daemon}" + (f", state dir {m.group(1)}" if m else "")


def legacy_bridges(netns: NetnsRef = None) -> set[str] | None:
    """The interface names ``inet vzkit`` (a pre-identity daemon's table) mentions, or None
    if there is no such table."""
    text = _blocks(list_ruleset(netns)).get(("inet", LEGACY_TABLE))
    return None if text is None else set(re.findall(r'"([^"]+)"', text))


def forwarded_elsewhere(daemon: str, netns: NetnsRef = None) -> set[tuple[str, int]]:
    """(proto, host port) forwarded by other vzkit daemons' tables in the namespace; none
    known where the ruleset cannot be read (no privilege: the daemon always has it)."""
    found: set[tuple[str, int]] = set()
    try:
        ruleset = list_ruleset(netns)
    except (EngineError, HostUnsupported):
        return found
    for (family, name), text in _blocks(ruleset).items():
        if family != "inet" or name == table_name(daemon):
            continue
        if name != LEGACY_TABLE and not name.startswith(TABLE_PREFIX):
            continue
        for proto, port in re.findall(r"\b(tcp|udp) dport (\d+) dnat", text):
            found.add((proto, int(port)))
    return found
