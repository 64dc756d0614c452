"""`vz snapshot`: an instance's snapshots."""

from __future__ import annotations

import argparse
import sys

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, subcommands
from vzkit.cli.render import (
    age_since,
    dump_models,
    format_size,
    json_mode,
    show,
    show_fields,
    table,
)
from vzkit.sdk.client import Client

commands = CommandSet()


@commands.add("snapshot", "snapshots of an instance")
def _snapshot(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "snapshot_cmd", "create|list|info|restore|delete")
    sc = sub.add("create", "take a snapshot", cmd_snapshot_create)
    sc.add_argument("instance")
    sc.add_argument("snapshot", nargs="?", help="its name (default: snap0, snap1, ...)")
    sc.add_argument("--stateful", action="store_true", help="also save the running memory (VMs)")
    sub.add("list", "list snapshots", cmd_snapshot_list).add_argument("instance")
    for verb, text, handler in (
        ("info", "show a snapshot", cmd_snapshot_info),
        (
            "restore",
            "go back to a snapshot (a running instance is restarted)",
            cmd_snapshot_restore,
        ),
        ("delete", "delete a snapshot", cmd_snapshot_delete),
    ):
        sp = sub.add(verb, text, handler)
        sp.add_argument("instance")
        sp.add_argument("snapshot")


def cmd_snapshot_create(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    snap = checks.check_name(args.snapshot, "snapshot") if args.snapshot else None
    info = client.create_snapshot(name, snap, stateful=args.stateful)
    kind = "stateful snapshot" if info.stateful else "snapshot"
    return show(args, info, f"{name}: {kind} {info.name} taken ({format_size(info.size)})")


def cmd_snapshot_list(args: argparse.Namespace, client: Client) -> int:
    snaps = client.list_snapshots(checks.check_name(args.instance))
    if json_mode(args):
        dump_models(snaps, sys.stdout)
        return 0
    rows = [
        (s.name, "yes" if s.stateful else "no", format_size(s.size), age_since(s.created_at))
        for s in snaps
    ]
    table(("NAME", "STATEFUL", "SIZE", "AGE"), rows, sys.stdout)
    return 0


def cmd_snapshot_info(args: argparse.Namespace, client: Client) -> int:
    info = client.get_snapshot(
        checks.check_name(args.instance), checks.check_name(args.snapshot, "snapshot")
    )
    return show_fields(args, info)


def cmd_snapshot_restore(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    inst = client.restore_snapshot(name, checks.check_name(args.snapshot, "snapshot"))
    return show(args, inst, f"{name}: restored {args.snapshot}, {inst.state.value}")


def cmd_snapshot_delete(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    client.delete_snapshot(name, checks.check_name(args.snapshot, "snapshot"))
    if not json_mode(args):
        sys.stdout.write(f"{name}: snapshot {args.snapshot} deleted\n")
    return 0
