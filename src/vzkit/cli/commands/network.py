"""`vz network`, `vz port` and `vz firewall`: networks and instances' network settings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, subcommands
from vzkit.cli.render import dump_json, dump_models, json_mode, show, show_fields, table
from vzkit.sdk.client import Client

if TYPE_CHECKING:
    from vzkit.api.instances import Instance

commands = CommandSet()


def network_pairs(i: Instance) -> list[tuple[str, object]]:
    """The network lines of `vz info`."""
    pairs: list[tuple[str, object]] = [
        (f"nic {n.name}", f"{n.network} {n.ip} {n.mac}") for n in i.nics
    ]
    pairs += [(f"port {p.host_port}/{p.proto}", f"-> {p.ip}:{p.port}") for p in i.ports]
    if i.firewall is not None:
        pairs.append(("firewall", f"allow-list, {len(i.firewall)} rule(s): vz firewall list"))
    return pairs


# -- vz network -------------------------------------------------------------------------------


@commands.add("network", "manage virtual networks")
def _network(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "network_cmd", "create|list|show|set|delete|attach|detach")
    np_ = sub.add("create", "create a network", cmd_network_create)
    np_.add_argument("name")
    np_.add_argument("--subnet", help="IPv4 CIDR, e.g. 10.90.0.0/24 (default: a free /24)")
    np_.add_argument("--isolated", action="store_true", help="no NAT, no route out")
    np_.add_argument("--domain", help="DNS domain for instance names (default: vz)")
    sub.add("list", "list networks", cmd_network_list)
    sub.add("show", "show a network", cmd_network_show).add_argument("name")
    sub.add("delete", "delete a network", cmd_network_delete).add_argument("name")
    sp = sub.add("set", "change a network", cmd_network_set)
    sp.add_argument("name")
    sp.add_argument("settings", nargs="+", metavar="KEY=VALUE", help="isolated, dns_domain")
    ap = sub.add("attach", "give an instance an interface", cmd_network_attach)
    ap.add_argument("instance")
    ap.add_argument("network")
    ap.add_argument("--ip", help="static address (default: a free one)")
    ap.add_argument("--mac", help="MAC address (default: stable per instance)")
    dp = sub.add("detach", "remove an instance's interface", cmd_network_detach)
    dp.add_argument("instance")
    dp.add_argument("network")


def cmd_network_create(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {"name": checks.check_name(args.name, "network")}
    if args.subnet:
        body["subnet"] = args.subnet
    if args.isolated:
        body["isolated"] = True
    if args.domain:
        body["dns_domain"] = args.domain
    net = client.create_network(body)
    return show(args, net, f"{net.name}: {net.subnet} on {net.bridge}")


def cmd_network_list(args: argparse.Namespace, client: Client) -> int:
    nets = client.list_networks()
    if json_mode(args):
        dump_models(nets, sys.stdout)
        return 0
    users: dict[str, int] = {}
    for inst in client.list_instances():
        for nic in inst.nics:
            users[nic.network] = users.get(nic.network, 0) + 1
    rows = [
        (
            n.name,
            str(n.subnet),
            str(n.gateway),
            n.bridge,
            "isolated" if n.isolated else "nat",
            users.get(n.name, 0),
        )
        for n in nets
    ]
    table(("NAME", "SUBNET", "GATEWAY", "BRIDGE", "MODE", "INSTANCES"), rows, sys.stdout)
    return 0


def cmd_network_show(args: argparse.Namespace, client: Client) -> int:
    net = client.get_network(checks.check_name(args.name, "network"))
    return show_fields(args, net)


_NETWORK_KEYS: dict[str, Callable[[str], object]] = {
    "isolated": checks.parse_bool,
    "dns_domain": str,
}


def cmd_network_set(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "network")
    net = client.update_network(name, **checks.parse_settings(args.settings, _NETWORK_KEYS))
    return show(args, net, f"{net.name}: {'isolated' if net.isolated else 'nat'}")


def cmd_network_delete(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "network")
    client.delete_network(name)
    if not json_mode(args):
        sys.stdout.write(f"{name}: deleted\n")
    return 0


def cmd_network_attach(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    network = checks.check_name(args.network, "network")
    inst = client.attach_network(name, network, ip=args.ip, mac=args.mac)
    nic = next(n for n in reversed(inst.nics) if n.network == network)
    return show(args, inst, f"{name}: {nic.name} on {network}, {nic.ip} ({nic.mac})")


def cmd_network_detach(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    network = checks.check_name(args.network, "network")
    inst = client.detach_network(name, network)
    return show(args, inst, f"{name}: detached from {network}")


# -- vz port ----------------------------------------------------------------------------------


@commands.add("port", "forward host ports to instances")
def _port(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "port_cmd", "add|list|remove")
    pp = sub.add("add", "forward a host port", cmd_port_add)
    pp.add_argument("instance")
    pp.add_argument("spec", metavar="HOSTPORT:PORT[/tcp|udp]")
    pl = sub.add("list", "list port forwards", cmd_port_list)
    pl.add_argument("instance", nargs="?")
    pr = sub.add("remove", "remove a port forward", cmd_port_remove)
    pr.add_argument("instance")
    pr.add_argument("spec", metavar="HOSTPORT[/tcp|udp]")


def cmd_port_add(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    spec = checks.parse_port(args.spec)
    inst = client.add_port(name, spec["host_port"], spec["port"], spec["proto"])
    pf = next(p for p in inst.ports if p.host_port == spec["host_port"])
    text = f"{name}: host port {pf.host_port}/{pf.proto} -> {pf.ip}:{pf.port}"
    return show(args, inst, text)


def cmd_port_list(args: argparse.Namespace, client: Client) -> int:
    if args.instance:
        instances = [client.get_instance(checks.check_name(args.instance))]
    else:
        instances = client.list_instances()
    rows = [
        (i.name, p.host_port, p.proto.value, str(p.ip), p.port) for i in instances for p in i.ports
    ]
    if json_mode(args):
        keys = ("instance", "host_port", "proto", "ip", "port")
        dump_json([dict(zip(keys, r, strict=True)) for r in rows], sys.stdout)
    else:
        table(("INSTANCE", "HOST PORT", "PROTO", "ADDRESS", "PORT"), rows, sys.stdout)
    return 0


def cmd_port_remove(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    port, proto = checks.parse_host_port(args.spec)
    inst = client.remove_port(name, port, proto)
    return show(args, inst, f"{name}: host port {port}/{proto} no longer forwarded")


# -- vz firewall ------------------------------------------------------------------------------


@commands.add("firewall", "instances' ingress allow-lists (nftables)")
def _firewall(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "firewall_cmd", "add|list|remove|deny-all|open")
    fp = sub.add(
        "add", "allow ingress (from the first rule on, the rest is dropped)", cmd_firewall_add
    )
    fp.add_argument("instance")
    fp.add_argument("--source", default="0.0.0.0/0", metavar="CIDR", help="allowed sources")
    fp.add_argument("--proto", choices=["tcp", "udp"], help="only this protocol")
    fp.add_argument("--port", type=int, help="only this destination port (needs --proto)")
    sub.add("list", "show the allow-list", cmd_firewall_list).add_argument("instance")
    fr = sub.add("remove", "remove a rule by its number", cmd_firewall_remove)
    fr.add_argument("instance")
    fr.add_argument("index", type=int, metavar="N")
    sub.add(
        "deny-all", "drop all ingress (an empty allow-list)", cmd_firewall_deny_all
    ).add_argument("instance")
    sub.add("open", "remove the allow-list: let everything in", cmd_firewall_open).add_argument(
        "instance"
    )


def cmd_firewall_add(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    if args.port is not None and args.proto is None:
        raise checks.UsageError(
            "--port needs --proto tcp or udp", hint="e.g. --proto tcp --port 22"
        )
    inst = client.add_firewall_rule(name, source=args.source, proto=args.proto, port=args.port)
    n = len(inst.firewall or [])
    return show(args, inst, f"{name}: rule {n - 1} added; ingress not allowed is dropped")


def cmd_firewall_list(args: argparse.Namespace, client: Client) -> int:
    inst = client.get_instance(checks.check_name(args.instance))
    rules = inst.firewall
    if json_mode(args):
        dump_json(
            {
                "enabled": rules is not None,
                "rules": [r.model_dump(mode="json") for r in rules or []],
            },
            sys.stdout,
        )
        return 0
    if rules is None:
        sys.stdout.write(f"{inst.name}: no allow-list, all ingress is let in\n")
        return 0
    rows = [
        (i, str(r.source), r.proto.value if r.proto else "any", r.port or "any")
        for i, r in enumerate(rules)
    ]
    table(("N", "SOURCE", "PROTO", "PORT"), rows, sys.stdout)
    sys.stdout.write("anything else: dropped\n")
    return 0


def cmd_firewall_remove(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    inst = client.remove_firewall_rule(name, args.index)
    left = len(inst.firewall or [])
    return show(args, inst, f"{name}: rule {args.index} removed, {left} left")


def cmd_firewall_deny_all(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    return show(args, client.set_firewall(name, []), f"{name}: all ingress dropped")


def cmd_firewall_open(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    return show(args, client.set_firewall(name, None), f"{name}: all ingress let in")
