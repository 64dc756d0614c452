"""`vz network`, `vz port` and `vz firewall`: networks and instances' network settings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vzkit.cli import checks
from vzkit.cli.render import dump_json, dump_models, json_mode, show, show_fields, table
from vzkit.sdk.client import Client

if TYPE_CHECKING:
    from vzkit.api.instances import Instance

Handler = Callable[[argparse.Namespace, Client], int]


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


HANDLERS: dict[str, Handler] = {
    "network.create": cmd_network_create,
    "network.list": cmd_network_list,
    "network.show": cmd_network_show,
    "network.set": cmd_network_set,
    "network.delete": cmd_network_delete,
    "network.attach": cmd_network_attach,
    "network.detach": cmd_network_detach,
    "port.add": cmd_port_add,
    "port.list": cmd_port_list,
    "port.remove": cmd_port_remove,
    "firewall.add": cmd_firewall_add,
    "firewall.list": cmd_firewall_list,
    "firewall.remove": cmd_firewall_remove,
    "firewall.deny-all": cmd_firewall_deny_all,
    "firewall.open": cmd_firewall_open,
}
