"""What every ``vz`` command module uses: how a command declares its parser and handler.

A command module (``vzkit.cli.commands.*``) holds, for each of its commands, the function that
adds the command's arguments and the handler that runs it, side by side::

    commands = CommandSet()

    @commands.add("launch", "create and start an instance")
    def _launch(p: argparse.ArgumentParser) -> None:
        p.add_argument("image")
        bind(p, cmd_launch)

``vzkit.cli.main`` collects every module's set and builds one parser from them; the handler
bound to the parser that matched runs. Kept free of pydantic and websockets: it is imported
before the first request.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from vzkit.errors import VzError

if TYPE_CHECKING:
    from vzkit.sdk.client import Client

__all__ = [
    "GLOBAL_OPTIONS",
    "CommandSet",
    "Handler",
    "LocalHandler",
    "Parser",
    "Subcommands",
    "bind",
    "bind_local",
    "global_options",
    "print_error",
    "subcommands",
]

# A command's handler gets the parsed arguments and a client; it returns the exit status.
Handler = Callable[[argparse.Namespace, "Client"], int]
# A command that needs no vzd (vz remote: this host's own files).
LocalHandler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\nhint: see: {self.prog} --help\n")
        sys.exit(2)


def global_options(defaults: bool) -> Parser:
    """The options every command takes, before or after its name (``vz list --format json``
    works too); in subcommands their defaults are SUPPRESS, so a value given before the
    subcommand is not reset."""
    p = Parser(add_help=False)

    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument(
        "--format",
        choices=["table", "json"],
        default=d("table"),
        help="output format (default: table)",
    )
    p.add_argument(
        "--debug", action="store_true", default=d(False), help="show tracebacks on errors"
    )
    p.add_argument(
        "--socket",
        type=Path,
        default=d(None),
        metavar="PATH",
        help="vzd's socket (default: $VZ_SOCKET or /run/vzkit/vzd.sock)",
    )
    p.add_argument(
        "--remote",
        dest="remote_name",  # `file push`'s positional is called remote
        default=d(None),
        metavar="NAME",
        help="talk to this remote's vzd over TLS (default: $VZ_REMOTE, or `vz remote switch`)",
    )
    p.add_argument(
        "--no-autostart",
        action="store_true",
        default=d(False),
        help="fail instead of starting vzd when it is not running",
    )
    return p


# The parent of every (sub)command's parser.
GLOBAL_OPTIONS = global_options(False)


def bind(p: argparse.ArgumentParser, handler: Handler, *, autostart: bool = True) -> None:
    """Run ``handler`` with a client when this parser matches; ``autostart=False`` for the
    commands that control vzd itself (they must not start it as a side effect)."""
    p.set_defaults(handler=handler, client_mode="auto" if autostart else "no-autostart")


def bind_local(p: argparse.ArgumentParser, handler: LocalHandler) -> None:
    """Run ``handler`` without a client (nothing to ask vzd)."""
    p.set_defaults(handler=handler, client_mode="none")


class Subcommands:
    """The subcommands of one command (``vz snapshot create|list|...``)."""

    def __init__(self, action: argparse._SubParsersAction[Parser]) -> None:
        self._action = action

    def add(
        self,
        name: str,
        help: str,
        handler: Handler | None = None,
        *,
        parents: Iterable[Parser] = (),
        autostart: bool = True,
    ) -> argparse.ArgumentParser:
        every = [GLOBAL_OPTIONS, *parents]
        parser: argparse.ArgumentParser = self._action.add_parser(name, help=help, parents=every)
        if handler is not None:
            bind(parser, handler, autostart=autostart)
        return parser


def subcommands(p: argparse.ArgumentParser, dest: str, metavar: str) -> Subcommands:
    action = p.add_subparsers(dest=dest, metavar=metavar, parser_class=Parser)
    action.required = True
    return Subcommands(action)


class CommandSet:
    """A module's top-level commands: name -> (help, the function that adds its arguments)."""

    def __init__(self) -> None:
        self._commands: dict[str, tuple[str, Configure]] = {}

    def add(self, name: str, help: str) -> Callable[[Configure], Configure]:
        def declare(configure: Configure) -> Configure:
            if name in self._commands:
                raise ValueError(f"vz {name} is declared twice")
            self._commands[name] = (help, configure)
            return configure

        return declare

    def __iter__(self) -> Iterator[tuple[str, str, Configure]]:
        for name, (help, configure) in self._commands.items():
            yield name, help, configure


def print_error(exc: VzError) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")
