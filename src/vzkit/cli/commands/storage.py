"""`vz storage` (pools) and `vz volume`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, Parser, subcommands
from vzkit.cli.render import dump_models, format_size, json_mode, show, show_fields, table
from vzkit.sdk.client import Client

commands = CommandSet()


def parse_volume(spec: str) -> dict[str, Any]:
    """--volume NAME[:PATH][:ro] (pool: POOL/NAME)."""
    parts = spec.split(":")
    ref, rest = parts[0], parts[1:]
    pool, _, name = ref.rpartition("/")
    att: dict[str, Any] = {"volume": checks.check_name(name, "volume")}
    if pool:
        att["pool"] = checks.check_name(pool, "pool")
    for part in rest:
        if part == "ro":
            att["readonly"] = True
        elif part.startswith("/"):
            att["path"] = part
        else:
            raise checks.UsageError(
                f"invalid --volume {spec!r}", hint="use [POOL/]NAME[:/mount/path][:ro]"
            )
    return att


# -- vz storage ---------------------------------------------------------------------------


@commands.add("storage", "storage pools")
def _storage(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "storage_cmd", "create|list|info|delete")
    c = sub.add("create", "create a pool (a directory)", cmd_storage_create)
    c.add_argument("name")
    c.add_argument("--path", help="an empty directory (default: under the state directory)")
    sub.add("list", "list pools", cmd_storage_list)
    sub.add("info", "show a pool", cmd_storage_info).add_argument("name")
    sub.add("delete", "delete an empty pool", cmd_storage_delete).add_argument("name")


def cmd_storage_create(args: argparse.Namespace, client: Client) -> int:
    pool = client.create_pool(checks.check_name(args.name, "pool"), args.path)
    return show(args, pool, f"{pool.name}: {pool.driver} pool at {pool.path}")


def cmd_storage_list(args: argparse.Namespace, client: Client) -> int:
    pools = client.list_pools()
    if json_mode(args):
        dump_models(pools, sys.stdout)
        return 0
    rows = [
        (p.name, p.driver, str(p.path), format_size(p.free), format_size(p.total)) for p in pools
    ]
    table(("NAME", "DRIVER", "PATH", "FREE", "SIZE"), rows, sys.stdout)
    return 0


def cmd_storage_info(args: argparse.Namespace, client: Client) -> int:
    pool = client.get_pool(checks.check_name(args.name, "pool"))
    return show_fields(args, pool)


def cmd_storage_delete(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "pool")
    client.delete_pool(name)
    if not json_mode(args):
        sys.stdout.write(f"{name}: deleted\n")
    return 0


# -- vz volume ----------------------------------------------------------------------------


@commands.add("volume", "volumes: extra disks (VMs) and directories (containers)")
def _volume(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "volume_cmd", "create|list|info|resize|delete|attach|detach")
    pool = Parser(add_help=False)
    pool.add_argument("--pool", default="default", help="the pool (default: default)")
    c = sub.add("create", "create a volume", cmd_volume_create, parents=[pool])
    c.add_argument("name")
    c.add_argument("--size", help="e.g. 10GiB (default 1GiB)")
    c.add_argument(
        "--content",
        choices=["block", "filesystem"],
        default="block",
        help="block: a disk for VMs; filesystem: a directory for containers",
    )
    ls = sub.add("list", "list volumes", cmd_volume_list)
    ls.add_argument("--pool", default=None)
    sub.add("info", "show a volume", cmd_volume_info, parents=[pool]).add_argument("name")
    r = sub.add("resize", "grow a volume (live on running VMs)", cmd_volume_resize, parents=[pool])
    r.add_argument("name")
    r.add_argument("size")
    sub.add("delete", "delete a volume", cmd_volume_delete, parents=[pool]).add_argument("name")
    a = sub.add("attach", "give an instance a volume", cmd_volume_attach, parents=[pool])
    a.add_argument("instance")
    a.add_argument("volume")
    a.add_argument("--path", help="containers: where to mount it")
    a.add_argument("--readonly", action="store_true")
    d = sub.add("detach", "take a volume from an instance", cmd_volume_detach, parents=[pool])
    d.add_argument("instance")
    d.add_argument("volume")


def cmd_volume_create(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "volume")
    size = checks.check_volume_size(args.size) if args.size else 1024**3
    vol = client.create_volume(name, size, pool=args.pool, content=args.content)
    return show(args, vol, f"{vol.name}: {args.content} volume, {format_size(vol.size)}")


def cmd_volume_list(args: argparse.Namespace, client: Client) -> int:
    vols = client.list_volumes(args.pool)
    if json_mode(args):
        dump_models(vols, sys.stdout)
        return 0
    rows = [
        (
            v.name,
            v.pool,
            v.content,
            format_size(v.size),
            format_size(v.used),
            ",".join(v.attached_to) or "-",
        )
        for v in vols
    ]
    table(("NAME", "POOL", "CONTENT", "SIZE", "USED", "ATTACHED TO"), rows, sys.stdout)
    return 0


def cmd_volume_info(args: argparse.Namespace, client: Client) -> int:
    vol = client.get_volume(checks.check_name(args.name, "volume"), args.pool)
    return show_fields(args, vol)


def cmd_volume_resize(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "volume")
    vol = client.resize_volume(name, checks.check_volume_size(args.size), pool=args.pool)
    return show(args, vol, f"{vol.name}: {format_size(vol.size)}")


def cmd_volume_delete(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "volume")
    client.delete_volume(name, pool=args.pool)
    if not json_mode(args):
        sys.stdout.write(f"{name}: deleted\n")
    return 0


def cmd_volume_attach(args: argparse.Namespace, client: Client) -> int:
    inst = checks.check_name(args.instance)
    name = checks.check_name(args.volume, "volume")
    result = client.attach_volume(
        inst, name, pool=args.pool, path=args.path, readonly=args.readonly
    )
    where = args.path or f"/dev/disk/by-id/virtio-{name[:20]}"
    return show(args, result, f"{inst}: volume {name} at {where}")


def cmd_volume_detach(args: argparse.Namespace, client: Client) -> int:
    inst = checks.check_name(args.instance)
    name = checks.check_name(args.volume, "volume")
    result = client.detach_volume(inst, name, pool=args.pool)
    return show(args, result, f"{inst}: volume {name} detached")
