"""`vz copy`, `export`, `import` and `publish`: instances copied, moved and made images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, bind
from vzkit.cli.render import (
    Progress,
    dump_json,
    format_size,
    json_mode,
    show,
)
from vzkit.sdk.client import Client

commands = CommandSet()


@commands.add("copy", "copy an instance (copy-on-write: instant)")
def _copy(p: argparse.ArgumentParser) -> None:
    p.add_argument("source")
    p.add_argument("target")
    bind(p, cmd_copy)


def cmd_copy(args: argparse.Namespace, client: Client) -> int:
    src, dst = checks.check_name(args.source), checks.check_name(args.target)
    inst = client.copy_instance(src, dst)
    return show(args, inst, f"{dst}: copy of {src}, {inst.state.value} (start it: vz start {dst})")


@commands.add("export", "write an instance (disks, files, snapshots) to an archive")
def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("instance")
    p.add_argument("file", help="the archive to write ('-': standard output)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    bind(p, cmd_export)


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


@commands.add("import", "create an instance from an archive made by vz export")
def _import(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the archive ('-': standard input)")
    p.add_argument("--name", help="a new name (default: the exported one)")
    bind(p, cmd_import)


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


@commands.add("publish", "turn a VM's disk into a new image")
def _publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("instance")
    p.add_argument("image")
    bind(p, cmd_publish)


def cmd_publish(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.instance)
    image = checks.check_name(args.image, "image")
    progress = Progress(f"publishing {name} as {image}")
    try:
        info = client.publish_instance(name, image, progress)
    finally:
        progress.done()
    return show(args, info, f"{info.name} {info.digest} ({format_size(info.size)})")
