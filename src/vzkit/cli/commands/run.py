"""`vz run`, `exec`, `shell` and `console`: commands and terminals inside instances."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vzkit.cli import checks
from vzkit.cli.base import CommandSet, bind
from vzkit.cli.checks import UsageError
from vzkit.cli.commands.instances import create_body, ensure_image, instance_options, warn
from vzkit.errors import DaemonUnavailable, VzError
from vzkit.sdk.client import Client, preload

if TYPE_CHECKING:
    from vzkit.api.instances import ExecResult

commands = CommandSet()


def exit_status(result: ExecResult) -> int:
    """Map a guest command's outcome onto this process's exit status, as a shell would."""
    if result.timed_out:
        sys.stderr.write("error: the command timed out and was killed\n")
        return 124
    if result.error:
        sys.stderr.write(f"error: {result.error}\n")
        return result.exit_code if result.exit_code > 0 else 1
    if result.signal:
        return 128 + result.signal
    if result.exit_code < 0:
        return 128 + (-result.exit_code & 0x7F)
    return result.exit_code & 0xFF


def _exec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", "-e", action="append", metavar="K=V", help="repeatable")
    p.add_argument("--workdir", "-w", default=None, metavar="DIR")
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="kill the command after S seconds"
    )
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument(
        "-i", "--interactive", action="store_true", help="pass stdin even when it is a terminal"
    )
    p.add_argument("command", nargs="*", help="the command, after --")


def _stdin_for(args: argparse.Namespace) -> Any:
    # A terminal is only read when asked (-i): a stray `vz run` must not swallow typing.
    if args.interactive or not os.isatty(0):
        return sys.stdin.buffer
    return None


def _exec_checks(args: argparse.Namespace, usage: str) -> dict[str, Any]:
    if not args.command:
        raise UsageError("no command given", hint=f"put the command after --: {usage}")
    if args.tty and not os.isatty(0):
        raise UsageError("-t needs a terminal on stdin", hint="drop -t when piping input")
    return {
        "env": checks.parse_env(args.env),
        "cwd": args.workdir,
        "timeout": checks.check_timeout(args.timeout),
    }


def _run_command(client: Client, name: str, args: argparse.Namespace, opts: dict[str, Any]) -> int:
    if args.tty:
        result = client.exec_interactive(name, args.command, tty=True, **opts)
    else:
        result = client.exec(
            name,
            args.command,
            stdin=_stdin_for(args),
            stdout=sys.stdout.buffer,
            stderr=sys.stderr.buffer,
            **opts,
        )
    return exit_status(result)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    # Cleanup must finish: a second Ctrl-C during the delete would leave the instance behind.
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# -- vz run -----------------------------------------------------------------------------------


@commands.add("run", "run a command in a fresh ephemeral instance")
def _run(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", nargs="?", help="the image (not with --from)")
    p.add_argument(
        "--from",
        dest="source",
        metavar="INSTANCE/SNAPSHOT",
        help="start from a stateful snapshot's memory instead of booting (warm start)",
    )
    p.add_argument("--name", default=None)
    instance_options(p)
    _exec_options(p)
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--rm", dest="keep", action="store_false", help="delete it (default)")
    keep.add_argument("--keep", dest="keep", action="store_true", help="leave it running")
    p.set_defaults(keep=False)
    bind(p, cmd_run)


def cmd_run(args: argparse.Namespace, client: Client) -> int:
    if (args.image is None) == (args.source is None):
        raise UsageError(
            "give an image or --from INSTANCE/SNAPSHOT, not both or neither",
            hint="vz run minimal -- CMD, or vz run --from web/s1 -- CMD",
        )
    image = checks.check_name(args.image, "image") if args.image else "minimal"
    # Naming it here means an interrupted create can still be found and deleted.
    name = checks.check_name(args.name) if args.name else f"run-{os.urandom(4).hex()}"
    body = create_body(args, image, name)
    body.update(ephemeral=True, start=True)
    if args.source:
        body.update(source=args.source)
        body.pop("image")
    opts = _exec_checks(args, "vz run IMAGE -- CMD...")
    preload("websockets.sync.client")
    if not args.source:
        ensure_image(client, image)
    created = False
    try:
        try:
            warn(client.create_instance(body))
        except VzError as exc:
            # The daemon answered with an error: nothing was made (unless we lost it mid-way).
            created = isinstance(exc, DaemonUnavailable)
            raise
        except BaseException:
            created = True
            raise
        created = True
        return _run_command(client, name, args, opts)
    finally:
        if created and not args.keep:
            with _sigint_deferred():
                client.delete_quietly(name)
        elif created:
            sys.stderr.write(f"kept instance {name}\n")


# -- vz exec / shell / console ----------------------------------------------------------------


@commands.add("exec", "run a command in an instance")
def _exec(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    _exec_options(p)
    bind(p, cmd_exec)


def cmd_exec(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    opts = _exec_checks(args, f"vz exec {name} -- CMD...")
    return _run_command(client, name, args, opts)


@commands.add("shell", "open a shell in an instance")
def _shell(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    bind(p, cmd_shell)


def cmd_shell(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    if not os.isatty(0):
        raise UsageError("vz shell needs a terminal", hint=f"use: vz exec {name} -- sh")
    return exit_status(client.exec_interactive(name, ["/bin/sh", "-l"], tty=True))


@commands.add("console", "attach to the serial console (Ctrl-] detaches)")
def _console(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--show-log", action="store_true", help="print the console log and exit")
    bind(p, cmd_console)


def cmd_console(args: argparse.Namespace, client: Client) -> int:
    name = checks.check_name(args.name)
    if args.show_log:
        sys.stdout.flush()
        sys.stdout.buffer.write(client.console_log(name))
        sys.stdout.buffer.flush()
        return 0
    client.console(name)
    return 0
