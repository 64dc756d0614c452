"""``vz``: parse the command line, call the SDK, render. Kept import-light for start-up time.

Each command lives in one module of ``vzkit.cli.commands``, its parser beside its handler;
this module only assembles them into one parser and runs the handler that matched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vzkit.cli.base import GLOBAL_OPTIONS, CommandSet, Parser, global_options, print_error
from vzkit.cli.commands import (
    files,
    host,
    images,
    instances,
    network,
    observe,
    remote,
    run,
    snapshots,
    storage,
    transfers,
)
from vzkit.errors import VzError

if TYPE_CHECKING:
    from vzkit.sdk.client import Client

GROUPS: tuple[CommandSet, ...] = tuple(
    m.commands
    for m in (
        run,
        instances,
        files,
        network,
        snapshots,
        storage,
        transfers,
        observe,
        images,
        host,
        remote,
    )
)

# The order `vz --help` lists the commands in (and names them in a usage error).
ORDER = (
    "run", "launch", "list", "info", "exec", "shell", "console", "file",
    "start", "stop", "restart", "pause", "resume", "delete", "config",
    "network", "snapshot", "storage", "volume", "copy", "export", "import",
    "monitor", "top", "publish", "port", "firewall", "image", "host", "daemon",
    "remote", "trust",
)  # fmt: skip

_TAKES_COMMAND = {"run", "exec"}


def build_parser() -> argparse.ArgumentParser:
    top = Parser(prog="vz", description="vzkit: micro-VMs and VMs", parents=[global_options(True)])
    sub = top.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    declared = {name: (help, configure) for group in GROUPS for name, help, configure in group}
    if set(declared) != set(ORDER):
        raise AssertionError(f"ORDER and the command modules differ: {set(declared) ^ set(ORDER)}")
    for name in ORDER:
        help, configure = declared[name]
        configure(sub.add_parser(name, help=help, parents=[GLOBAL_OPTIONS]))
    return top


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    parser = build_parser()
    # Everything after the first `--` is the guest command, verbatim (options included).
    if "--" in argv:
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        if args.cmd in _TAKES_COMMAND:
            args.command = list(args.command) + argv[cut + 1 :]
            return args
    return parser.parse_args(argv)


def client_for(args: argparse.Namespace, *, autostart: bool = True) -> Client:
    from vzkit.sdk.client import Client
    from vzkit.settings import default_remote

    remote_name = args.remote_name or (None if args.socket else default_remote())
    return Client(args.socket, autostart=autostart and not args.no_autostart, remote=remote_name)


def dispatch(args: argparse.Namespace) -> int:
    """Run the handler the command line chose, with a client unless it needs none."""
    if args.client_mode == "none":
        status: int = args.handler(args)
        return status
    with client_for(args, autostart=args.client_mode == "auto") as client:
        status = args.handler(args, client)
        return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(args)
    except VzError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        from vzkit.cli.checks import UsageError

        print_error(exc)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        if args.debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        # `vz list | head`: the reader left; say nothing more, and keep Python from
        # complaining while flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
