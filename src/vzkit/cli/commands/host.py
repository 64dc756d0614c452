"""`vz host` (what vzd found out about its host) and `vz daemon` (vzd itself: start, stop,
status, and the TLS API it listens on)."""

from __future__ import annotations

import argparse
import sys

from vzkit.cli.base import CommandSet, subcommands
from vzkit.cli.render import dump_json, flatten, format_size, json_mode, key_values
from vzkit.errors import DaemonUnavailable
from vzkit.sdk.client import Client

commands = CommandSet()


@commands.add("host", "the host")
def _host(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "host_cmd", "info")
    hp = sub.add("info", "host capabilities", cmd_host_info)
    hp.add_argument("--refresh", action="store_true", help="probe again")


def cmd_host_info(args: argparse.Namespace, client: Client) -> int:
    info = client.host_info(refresh=args.refresh).model_dump(mode="json")
    if json_mode(args):
        dump_json(info, sys.stdout)
    else:
        for key in ("memory_total", "memory_available"):
            if isinstance(info.get(key), int):
                info[key] = format_size(info[key])
        key_values(flatten(info), sys.stdout)
    return 0


@commands.add("daemon", "control vzd")
def _daemon(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "daemon_cmd", "start|stop|status|listen")
    for name, handler in (
        ("start", cmd_daemon_start),
        ("stop", cmd_daemon_stop),
        ("status", cmd_daemon_status),
    ):
        sub.add(name, f"{name} vzd", handler, autostart=False)
    dl = sub.add(
        "listen", "serve the API over TLS (show, set, or off)", cmd_daemon_listen, autostart=False
    )
    dl.add_argument("address", nargs="?", metavar="HOST:PORT|:PORT|off")


def cmd_daemon_start(args: argparse.Namespace, client: Client) -> int:
    pid = client.server_info().pid if client.is_running() else client.start_daemon()
    if json_mode(args):
        dump_json({"running": True, "pid": pid}, sys.stdout)
    else:
        sys.stdout.write(f"{pid}\n")
    return 0


def cmd_daemon_stop(args: argparse.Namespace, client: Client) -> int:
    if not client.is_running():
        sys.stderr.write("vzd is not running\n")
        return 0
    client.shutdown_daemon(wait=True)
    return 0


def cmd_daemon_status(args: argparse.Namespace, client: Client) -> int:
    try:
        info = client.server_info()
    except DaemonUnavailable:
        if json_mode(args):
            dump_json({"running": False}, sys.stdout)
        else:
            sys.stdout.write(f"not running (socket {client.socket_path})\n")
        return 3
    if json_mode(args):
        dump_json({"running": True, **info.model_dump(mode="json", exclude_none=True)}, sys.stdout)
    else:
        sys.stdout.write(
            f"running (pid {info.pid}, version {info.server_version}, api {info.api_version})\n"
        )
    return 0


def cmd_daemon_listen(args: argparse.Namespace, client: Client) -> int:
    if args.address is None:
        info = client.server_config()
    else:
        off = args.address.lower() in ("off", "none", "")
        info = client.set_listen(None if off else args.address)
    if json_mode(args):
        dump_json(info.model_dump(mode="json"), sys.stdout)
        return 0
    if not info.listen:
        sys.stdout.write("the TLS API is off (turn it on: vz daemon listen :8443)\n")
        return 0
    key_values(
        [
            ("listen", info.listen),
            ("addresses", ", ".join(info.addresses) or "(not listening)"),
            ("ca fingerprint", info.ca_fingerprint or "-"),
        ],
        sys.stdout,
    )
    return 0
