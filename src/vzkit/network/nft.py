"""The nftables rules of vzkit's networks: one table, rendered whole and swapped atomically.

Layout: everything lives in ``table inet vzkit`` (the inet family has had NAT hooks since
Linux 5.2, so no separate ``ip`` NAT table is needed) and no rule anywhere else is touched:

* ``prerouting``/``output`` (nat): port forwards, DNAT of ``fib daddr type local`` traffic,
  i.e. anything addressed to one of the host's own addresses. The ``output`` copy makes
  forwards work from the host itself, 127.0.0.1 included.
* ``postrouting`` (nat): masquerade of NAT networks to everything outside their subnet;
  masquerade of 127.0.0.0/8-sourced forwarded connections (a DNAT'd localhost connection
  keeps source 127.0.0.1, which the instance could not answer) and of hairpin
  connections (an instance reaching a sibling through a host port).
* ``forward`` (filter): per-instance allow-lists first (``ip daddr`` -> ``fw_*`` chain:
  established/related, the listed sources/ports, drop the rest), then port-forwarded
  connections pass, traffic inside one bridge passes, traffic between two vzkit bridges is
  dropped, isolated bridges drop all forwarding, NAT bridges take only replies from outside.

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
:func:`apply` when none is left and by :func:`remove`.

Host-originated traffic (the daemon's own health checks, the host's shell) does not cross
the ``forward`` hook and is not subject to allow-lists.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from vzkit.api.networks import FirewallRule, NetworkConfig, PortForward
from vzkit.errors import EngineError, InvalidConfig
from vzkit.network import _bin
from vzkit.network._netns import NetnsRef, entered, read_sysctl, write_sysctl

__all__ = ["TABLE", "InstanceFirewall", "Ruleset", "apply", "list_ruleset", "remove", "render"]

TABLE = "inet vzkit"
_MULTICAST = ("224.0.0.0/24", "255.255.255.255")


@dataclass(frozen=True)
class InstanceFirewall:
    """An instance's ingress allow-list, keyed by its address."""

    ip: IPv4Address
    rules: Sequence[FirewallRule]


@dataclass(frozen=True)
class Ruleset:
    """The desired state: every network, port forward and allow-list vzkit has."""

    networks: Sequence[NetworkConfig] = ()
    forwards: Sequence[PortForward] = ()
    firewalls: Sequence[InstanceFirewall] = field(default_factory=tuple)

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


def render(rs: Ruleset) -> str:
    """The ``table inet vzkit`` definition for ``rs`` (nft syntax, deterministic)."""
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

    lines = ["table inet vzkit {"]

    def chain(name: str, hook: str | None, rules: list[str]) -> None:
        lines.append(f"\tchain {name} {{")
        if hook:
            lines.append(f"\t\t{hook}")
        lines.extend(f"\t\t{r}" for r in rules)
        lines.append("\t}")

    chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", dnat)
    chain("output", "type nat hook output priority -100; policy accept;", dnat)

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
    chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;", post)

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
    chain("forward", "type filter hook forward priority filter; policy accept;", fwd)

    for f in rs.firewalls:
        rules = ["ct state established,related accept", *(_rule_text(r) for r in f.rules), "drop"]
        chain(_fw_chain(f.ip), None, rules)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nft(script: str, netns: NetnsRef) -> None:
    nft = _bin.find("nft")
    with entered(netns):
        proc = subprocess.run(
            [nft, "-f", "-"], input=script, text=True, capture_output=True, check=False
        )
    if proc.returncode != 0:
        raise EngineError(
            f"nft rejected vzkit's ruleset: {proc.stderr.strip()}",
            hint="is the nftables kernel support (nf_tables, nft_nat) present?",
        )


# Declaring the table first makes the delete succeed whether or not it exists; all three
# statements are one nft transaction, so the old rules stay until the new ones are in.
_RESET = f"table {TABLE} {{}}\ndelete table {TABLE}\n"


def apply(rs: Ruleset, state_dir: Path, netns: NetnsRef = None) -> None:
    """Make the kernel's ``table inet vzkit`` exactly ``rs``, and the sysctls it needs."""
    _nft(_RESET + render(rs), netns)
    memo = state_dir / "ip_forward.orig"
    if rs.needs_forwarding:
        old = write_sysctl("net.ipv4.ip_forward", "1", netns)
        if old is not None and old != "1" and not memo.exists():
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(old + "\n")
    else:
        _restore_forwarding(memo, netns)
    for net in rs.networks:
        if net.bridge and any(pf.ip in net.subnet for pf in rs.forwards if pf.ip and net.subnet):
            write_sysctl(f"net.ipv4.conf.{net.bridge}.route_localnet", "1", netns)
    if rs.firewalls and read_sysctl("net.bridge.bridge-nf-call-iptables", netns) == "0":
        write_sysctl("net.bridge.bridge-nf-call-iptables", "1", netns)


def _restore_forwarding(memo: Path, netns: NetnsRef) -> None:
    if memo.exists():
        write_sysctl("net.ipv4.ip_forward", memo.read_text().strip(), netns)
        memo.unlink()


def remove(state_dir: Path, netns: NetnsRef = None) -> None:
    """Delete vzkit's table (fine if absent) and restore ip_forward; nothing else is touched."""
    _nft(_RESET, netns)
    _restore_forwarding(state_dir / "ip_forward.orig", netns)


def list_ruleset(netns: NetnsRef = None) -> str:
    """The whole ruleset of the namespace (all tables), for checks and diagnostics."""
    nft = _bin.find("nft")
    with entered(netns):
        return subprocess.run(
            [nft, "list", "ruleset"], capture_output=True, text=True, check=True
        ).stdout
