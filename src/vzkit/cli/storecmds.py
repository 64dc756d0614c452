"""`vz storage` (pools) and `vz volume`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from vzkit.cli import checks
from vzkit.cli.render import dump_models, format_size, json_mode, show, show_fields, table
from vzkit.sdk.client import Client

Handler = Callable[[argparse.Namespace, Client], int]


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


def cmd_volume_create(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "volume")
    size = checks.check_memory(args.size) if args.size else 1024**3
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
    vol = client.resize_volume(name, checks.check_memory(args.size), pool=args.pool)
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


HANDLERS: dict[str, Handler] = {
    "storage.create": cmd_storage_create,
    "storage.list": cmd_storage_list,
    "storage.info": cmd_storage_info,
    "storage.delete": cmd_storage_delete,
    "volume.create": cmd_volume_create,
    "volume.list": cmd_volume_list,
    "volume.info": cmd_volume_info,
    "volume.resize": cmd_volume_resize,
    "volume.delete": cmd_volume_delete,
    "volume.attach": cmd_volume_attach,
    "volume.detach": cmd_volume_detach,
}


def add_parsers(
    add: Callable[[str, str], argparse.ArgumentParser],
    g: argparse.ArgumentParser,
    parser_class: type[argparse.ArgumentParser],
) -> None:
    p = add("storage", "storage pools")
    sub = p.add_subparsers(
        dest="storage_cmd", metavar="create|list|info|delete", parser_class=parser_class
    )
    sub.required = True
    c = sub.add_parser("create", help="create a pool (a directory)", parents=[g])
    c.add_argument("name")
    c.add_argument("--path", help="an empty directory (default: under the state directory)")
    sub.add_parser("list", help="list pools", parents=[g])
    sub.add_parser("info", help="show a pool", parents=[g]).add_argument("name")
    sub.add_parser("delete", help="delete an empty pool", parents=[g]).add_argument("name")

    p = add("volume", "volumes: extra disks (VMs) and directories (containers)")
    sub = p.add_subparsers(
        dest="volume_cmd",
        metavar="create|list|info|resize|delete|attach|detach",
        parser_class=parser_class,
    )
    sub.required = True
    pool = argparse.ArgumentParser(add_help=False)
    pool.add_argument("--pool", default="default", help="the pool (default: default)")
    c = sub.add_parser("create", help="create a volume", parents=[g, pool])
    c.add_argument("name")
    c.add_argument("--size", help="e.g. 10GiB (default 1GiB)")
    c.add_argument(
        "--content",
        choices=["block", "filesystem"],
        default="block",
        help="block: a disk for VMs; filesystem: a directory for containers",
    )
    ls = sub.add_parser("list", help="list volumes", parents=[g])
    ls.add_argument("--pool", default=None)
    sub.add_parser("info", help="show a volume", parents=[g, pool]).add_argument("name")
    r = sub.add_parser("resize", help="grow a volume (live on running VMs)", parents=[g, pool])
    r.add_argument("name")
    r.add_argument("size")
    sub.add_parser("delete", help="delete a volume", parents=[g, pool]).add_argument("name")
    a = sub.add_parser("attach", help="give an instance a volume", parents=[g, pool])
    a.add_argument("instance")
    a.add_argument("volume")
    a.add_argument("--path", help="containers: where to mount it")
    a.add_argument("--readonly", action="store_true")
    d = sub.add_parser("detach", help="take a volume from an instance", parents=[g, pool])
    d.add_argument("instance")
    d.add_argument("volume")
