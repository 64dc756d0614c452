"""`vz file push|pull`: files into and out of instances."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, subcommands
from vzkit.cli.checks import UsageError
from vzkit.sdk.client import Client

commands = CommandSet()


@commands.add("file", "copy files to and from an instance")
def _file(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "file_cmd", "push|pull")
    fp = sub.add("push", "copy LOCAL (- = stdin) to NAME:/path", cmd_file_push)
    fp.add_argument("local")
    fp.add_argument("remote", metavar="NAME:/path")
    fp.add_argument("--mode", default=None, help="octal, default: the local file's")
    fp.add_argument("-p", "--parents", action="store_true", help="create missing directories")
    fp.add_argument(
        "--allow-setid",
        action="store_true",
        help="keep setuid/setgid bits (refused without it)",
    )
    fp = sub.add("pull", "copy NAME:/path to LOCAL (- = stdout)", cmd_file_pull)
    fp.add_argument("remote", metavar="NAME:/path")
    fp.add_argument("local")


def cmd_file_push(args: argparse.Namespace, client: Client) -> int:
    name, path = checks.split_remote(args.remote, "destination")
    setid = args.allow_setid
    mode = checks.parse_mode(args.mode, allow_setid=setid) if args.mode is not None else None
    if args.local == "-":
        mode = 0o644 if mode is None else mode
        client.push_file(
            name, path, sys.stdin.buffer, mode=mode, parents=args.parents, allow_setid=setid
        )
        return 0
    local = Path(args.local)
    try:
        f = local.open("rb")
    except OSError as exc:
        raise UsageError(
            f"cannot read {local}: {exc.strerror}", hint="check the local path"
        ) from exc
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{local} is not a regular file", hint="push one file at a time")
        if mode is None:
            mode = checks.check_mode(stat.S_IMODE(st.st_mode), f"{local}'s mode", setid)
        client.push_file(name, path, f, mode=mode, parents=args.parents, allow_setid=setid)
    return 0


def cmd_file_pull(args: argparse.Namespace, client: Client) -> int:
    name, path = checks.split_remote(args.remote, "source")
    if args.local == "-":
        _, chunks = client.pull_file(name, path)
        sys.stdout.flush()
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return 0
    local = Path(args.local)
    if local.is_dir():
        local = local / Path(path).name
    if not local.parent.is_dir():
        raise UsageError(f"{local.parent} is not a directory", hint="create it first")
    mode, chunks = client.pull_file(name, path)
    # Written beside the target and renamed: a failed transfer never leaves half a file.
    tmp = local.with_name(f".{local.name}.vz-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.chmod(tmp, mode & 0o777)
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 0
