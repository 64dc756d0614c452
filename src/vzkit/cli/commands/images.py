"""`vz image`: the images instances boot from."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, subcommands
from vzkit.cli.render import (
    Progress,
    age_since,
    dump_models,
    format_size,
    json_mode,
    key_values,
    table,
)
from vzkit.sdk.client import Client

if TYPE_CHECKING:
    from vzkit.api.instances import ImageInfo

commands = CommandSet()


@commands.add("image", "manage images")
def _image(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "image_cmd", "list|info|build|delete")
    sub.add("list", "list built images", cmd_image_list)
    sub.add("info", "show an image", cmd_image_info).add_argument("name")
    ip = sub.add("build", "build an image", cmd_image_build)
    ip.add_argument("name")
    ip.add_argument("--force", action="store_true", help="rebuild even if built")
    sub.add("delete", "delete an image", cmd_image_delete).add_argument("name")


def image_pairs(img: ImageInfo) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [
        ("name", img.name),
        ("kind", img.kind),
        ("digest", img.digest),
        ("kernel", img.kernel_release),
        ("size", format_size(img.size)),
        ("created", f"{img.created_at.isoformat()} ({age_since(img.created_at)} ago)"),
    ]
    pairs.extend((f"file {role}", p) for role, p in sorted(img.files.items()))
    return pairs


def cmd_image_list(args: argparse.Namespace, client: Client) -> int:
    images = client.list_images()
    if json_mode(args):
        dump_models(images, sys.stdout)
        return 0
    rows = [
        (
            i.name,
            i.kind,
            i.kernel_release,
            format_size(i.size),
            age_since(i.created_at),
            i.digest.removeprefix("sha256:")[:12],
        )
        for i in sorted(images, key=lambda i: i.name)
    ]
    table(("NAME", "KIND", "KERNEL", "SIZE", "AGE", "DIGEST"), rows, sys.stdout)
    return 0


def cmd_image_info(args: argparse.Namespace, client: Client) -> int:
    img = client.get_image(checks.check_name(args.name, "image"))
    if json_mode(args):
        sys.stdout.write(img.model_dump_json(indent=2) + "\n")
    else:
        key_values(image_pairs(img), sys.stdout)
    return 0


def cmd_image_build(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name, "image")
    progress = Progress(f"building image {name}")
    try:
        img = client.build_image(name, force=args.force, progress=progress)
    finally:
        progress.done()
    if json_mode(args):
        sys.stdout.write(img.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(f"{img.name} {img.digest}\n")
    return 0


def cmd_image_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_image(checks.check_name(args.name, "image"))
    return 0
