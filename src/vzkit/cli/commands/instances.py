"""`vz launch`, `list`, `info`, `start`/`stop`/`restart`/`pause`/`resume`, `delete`, `config`:
instances and their limits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, Handler, bind, print_error, subcommands
from vzkit.cli.commands.network import network_pairs
from vzkit.cli.commands.storage import parse_volume
from vzkit.cli.render import (
    Progress,
    age_since,
    dump_json,
    dump_models,
    format_size,
    json_mode,
    key_values,
    table,
)
from vzkit.errors import VzError
from vzkit.sdk.client import Client

if TYPE_CHECKING:
    from vzkit.api.instances import Instance

commands = CommandSet()


# -- what run and launch share ----------------------------------------------------------------


def instance_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--type", choices=["microvm", "vm", "container"], default=None, help="default: microvm"
    )
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--memory", default=None, metavar="SIZE", help="e.g. 512MiB, 1G (bare = MiB)")
    p.add_argument("--accel", choices=["kvm", "tcg"], default=None)
    p.add_argument(
        "--cpu-weight",
        type=int,
        default=None,
        metavar="N",
        help="relative CPU share against other instances, 1-10000 (default 100)",
    )
    p.add_argument(
        "--cpu-pin", default=None, metavar="LIST", help="host CPUs to run on, e.g. 0,2-3"
    )
    p.add_argument(
        "--network",
        action="append",
        metavar="NAME[,ip=ADDR][,mac=MAC]",
        help="attach to a network (repeatable: eth0, eth1, ...; default: vzbr0; 'none': no "
        "network)",
    )
    p.add_argument(
        "--volume",
        action="append",
        metavar="[POOL/]NAME[:PATH][:ro]",
        help="attach a volume (containers: mounted at PATH)",
    )
    p.add_argument(
        "-p",
        "--port",
        action="append",
        metavar="HOSTPORT:PORT[/PROTO]",
        help="forward a host port to the instance (repeatable)",
    )
    p.add_argument(
        "--privileged",
        action="store_true",
        help="containers: run as host root, without a user namespace (not recommended)",
    )


def create_body(args: argparse.Namespace, image: str, name: str | None) -> dict[str, Any]:
    """The create request from the instance options, each checked against api.bounds."""
    body: dict[str, Any] = {"image": image, "name": name}
    if args.type:
        body["type"] = args.type
    if args.accel:
        body["accel"] = args.accel
    limits: dict[str, Any] = {}
    if args.cpus is not None:
        limits["cpus"] = checks.check_cpus(args.cpus)
    if args.memory is not None:
        limits["memory"] = checks.check_memory(args.memory, args.type or "microvm")
    if args.cpu_weight is not None:
        limits["cpu_weight"] = checks.check_cpu_weight(args.cpu_weight)
    if args.cpu_pin is not None:
        limits["cpu_pin"] = checks.parse_cpu_list(args.cpu_pin)
    if limits:
        body["limits"] = limits
    if args.network:
        body["nics"] = (
            [] if args.network == ["none"] else [checks.parse_nic(n) for n in args.network]
        )
    if args.port:
        body["ports"] = [checks.parse_port(spec) for spec in args.port]
    if args.volume:
        body["volumes"] = [parse_volume(spec) for spec in args.volume]
    if args.privileged:
        body["security"] = {"privileged": True}
    return body


def warn(inst: Instance) -> None:
    """What the daemon says the user should know about the instance it made."""
    for warning in inst.warnings:
        sys.stderr.write(f"warning: {warning}\n")


def ensure_image(client: Client, image: str) -> None:
    if client.has_image(image):
        return
    progress = Progress(f"building image {image}")
    try:
        client.build_image(image, progress=progress)
    finally:
        progress.done()


# -- vz launch / list / info ------------------------------------------------------------------


@commands.add("launch", "create and start an instance")
def _launch(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("name", nargs="?")
    instance_options(p)
    bind(p, cmd_launch)


def cmd_launch(args: argparse.Namespace, client: Client) -> int:
    image = checks.check_name(args.image, "image")
    name = checks.check_name(args.name) if args.name else None
    body = create_body(args, image, name)
    ensure_image(client, image)
    inst = client.create_instance(body)
    warn(inst)
    if json_mode(args):
        sys.stdout.write(inst.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(f"{inst.name}\n")
    return 0


@commands.add("list", "list instances")
def _list(p: argparse.ArgumentParser) -> None:
    bind(p, cmd_list)


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    items = client.list_instances()
    if json_mode(args):
        dump_models(items, sys.stdout)
        return 0
    rows = [
        (
            i.name,
            i.type.value,
            i.state.value,
            i.image,
            i.limits.cpus,
            format_size(i.limits.memory),
            ",".join(str(n.ip) for n in i.nics) or "-",
            i.pid,
            age_since(i.created_at),
        )
        for i in sorted(items, key=lambda i: i.name)
    ]
    head = ("NAME", "TYPE", "STATE", "IMAGE", "CPUS", "MEMORY", "IPV4", "PID", "AGE")
    table(head, rows, sys.stdout)
    return 0


def instance_pairs(i: Instance) -> list[tuple[str, object]]:
    return [
        ("name", i.name),
        ("type", i.type.value),
        ("state", i.state.value),
        ("reason", i.reason),
        ("image", i.image),
        ("image digest", i.image_digest),
        ("cpus", i.limits.cpus),
        ("memory", format_size(i.limits.memory)),
        ("cpu weight", i.limits.cpu_weight),
        ("cpu pin", ",".join(map(str, i.limits.cpu_pin)) if i.limits.cpu_pin else "any"),
        ("processes", i.limits.processes),
        ("privileged", "yes" if i.security.privileged else "no"),
        ("accel", i.accel.value if i.accel else None),
        ("ephemeral", "yes" if i.ephemeral else "no"),
        ("pid", i.pid),
        ("created", f"{i.created_at.isoformat()} ({age_since(i.created_at)} ago)"),
        ("started", i.started_at.isoformat() if i.started_at else None),
        ("agent", i.agent_version),
        ("kernel", i.kernel_release),
        *network_pairs(i),
        *(
            (
                f"volume {v.pool}/{v.volume}",
                (v.path or "disk") + (" (read-only)" if v.readonly else ""),
            )
            for v in i.volumes
        ),
    ]


@commands.add("info", "show an instance")
def _info(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    bind(p, cmd_info)


def cmd_info(args: argparse.Namespace, client: Client) -> int:
    inst = client.get_instance(checks.check_name(args.name))
    if json_mode(args):
        sys.stdout.write(inst.model_dump_json(indent=2) + "\n")
    else:
        key_values(instance_pairs(inst), sys.stdout)
    return 0


# -- vz start / stop / restart / pause / resume / delete --------------------------------------


def _each(
    args: argparse.Namespace, action: Callable[[str], Instance | None], done: str | None
) -> int:
    names = [checks.check_name(n) for n in args.names]
    failed = 0
    results: list[Any] = []
    for name in names:
        try:
            inst = action(name)
        except VzError as exc:
            # One bad name does not stop the rest; a single name reports as any error does.
            if len(names) == 1:
                raise
            failed += 1
            print_error(exc)
            continue
        if inst is not None:
            results.append(inst.model_dump(mode="json"))
            if not json_mode(args):
                sys.stdout.write(f"{name}: {inst.state.value}\n")
        else:
            results.append({"name": name, "status": done})
            if not json_mode(args):
                sys.stdout.write(f"{name}: {done}\n")
    if json_mode(args):
        dump_json(results, sys.stdout)
    return 1 if failed else 0


def _state_cmd(action: str) -> Handler:
    def handler(args: argparse.Namespace, client: Client) -> int:
        if action in ("stop", "restart"):
            checks.check_stop_timeout(args.timeout)
            method = getattr(client, action)
            return _each(args, lambda n: method(n, force=args.force, timeout=args.timeout), None)
        return _each(args, getattr(client, action), None)

    return handler


def _declare_state_command(action: str) -> None:
    @commands.add(action, f"{action} instances")
    def _state(p: argparse.ArgumentParser) -> None:
        p.add_argument("names", nargs="+", metavar="NAME")
        if action in ("stop", "restart"):
            p.add_argument("--force", action="store_true", help="kill instead of a clean stop")
            p.add_argument("--timeout", type=float, default=30.0, metavar="S")
        bind(p, _state_cmd(action))


for _action in ("start", "stop", "restart", "pause", "resume"):
    _declare_state_command(_action)


@commands.add("delete", "delete instances")
def _delete(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--force", action="store_true", help="kill running instances")
    bind(p, cmd_delete)


def cmd_delete(args: argparse.Namespace, client: Client) -> int:
    def delete(name: str) -> None:
        client.delete_instance(name, force=args.force)

    return _each(args, delete, "deleted")


# -- vz config --------------------------------------------------------------------------------


@commands.add("config", "show or change an instance's limits")
def _config(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "config_cmd", "show|set")
    sub.add("show", "show the limits", cmd_config_show).add_argument("name")
    cp = sub.add("set", "change limits (live where possible)", cmd_config_set)
    cp.add_argument("name")
    cp.add_argument(
        "settings",
        nargs="+",
        metavar="KEY=VALUE",
        help="limits.cpus, limits.memory, limits.cpu_weight, limits.cpu_pin, limits.processes",
    )


_CONFIG_KEYS = {
    "limits.cpus": checks.check_cpus_text,
    # The instance's type is not known here: the daemon checks the type's own floor.
    "limits.memory": checks.check_memory,
    "limits.cpu_weight": checks.check_cpu_weight_text,
    "limits.cpu_pin": checks.parse_cpu_list,
    "limits.processes": checks.check_processes_text,
}


def cmd_config_show(args: argparse.Namespace, client: Client) -> int:
    inst = client.get_instance(checks.check_name(args.name))
    limits = inst.limits.model_dump(mode="json")
    if json_mode(args):
        dump_json({"limits": limits}, sys.stdout)
    else:
        limits["memory"] = format_size(inst.limits.memory)
        key_values([(f"limits.{k}", v) for k, v in limits.items()], sys.stdout)
    return 0


def cmd_config_set(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    settings = checks.parse_settings(args.settings, _CONFIG_KEYS)
    limits = {key.removeprefix("limits."): value for key, value in settings.items()}
    inst = client.update_instance(name, {"limits": limits})
    if json_mode(args):
        sys.stdout.write(inst.model_dump_json(indent=2) + "\n")
    return 0
