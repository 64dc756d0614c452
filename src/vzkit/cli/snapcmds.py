"""`vz snapshot` and `vz copy`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from vzkit.cli import checks
from vzkit.cli.render import (
    Progress,
    age_since,
    dump_json,
    dump_models,
    format_size,
    json_mode,
    show,
    show_fields,
    table,
)
from vzkit.sdk.client import Client

Handler = Callable[[argparse.Namespace, Client], int]


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


def cmd_copy(args: argparse.Namespace, client: Client) -> int:
    src, dst = checks.check_name(args.source), checks.check_name(args.target)
    inst = client.copy_instance(src, dst)
    return show(args, inst, f"{dst}: copy of {src}, {inst.state.value} (start it: vz start {dst})")


def cmd_export(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    if args.file == "-":
        size = client.export_instance(name, sys.stdout.buffer)
        return 0
    target = Path(args.file)
    if target.exists() and not args.force:
        raise checks.UsageError(f"{target} exists", hint="give another file, or --force")
    tmp = target.with_name(target.name + ".part")
    progress = Progress(f"exporting {name}")
    try:
        with open(tmp, "wb") as out:
            size = client.export_instance(name, out, progress)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        progress.done()
    if not json_mode(args):
        sys.stdout.write(f"{name}: exported to {target} ({format_size(size)})\n")
    else:
        dump_json({"instance": name, "file": str(target), "size": size}, sys.stdout)
    return 0


def cmd_import(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name) if args.name else None
    if args.file == "-":
        inst = client.import_instance(sys.stdin.buffer, name)
    else:
        try:
            source = open(args.file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise checks.UsageError(
                f"cannot read {args.file}: {exc.strerror}", hint="give a file made by vz export"
            ) from exc
        with source:
            inst = client.import_instance(source, name)
    return show(args, inst, f"{inst.name}: imported, {inst.state.value} (vz start {inst.name})")


def cmd_publish(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    image = checks.check_name(args.image, "image")
    progress = Progress(f"publishing {name} as {image}")
    try:
        info = client.publish_instance(name, image, progress)
    finally:
        progress.done()
    return show(args, info, f"{info.name} {info.digest} ({format_size(info.size)})")


HANDLERS: dict[str, Handler] = {
    "snapshot.create": cmd_snapshot_create,
    "snapshot.list": cmd_snapshot_list,
    "snapshot.info": cmd_snapshot_info,
    "snapshot.restore": cmd_snapshot_restore,
    "snapshot.delete": cmd_snapshot_delete,
    "copy": cmd_copy,
    "export": cmd_export,
    "import": cmd_import,
    "publish": cmd_publish,
}
