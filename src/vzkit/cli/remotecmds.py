"""`vz remote` (this client's remotes), `vz trust` (who may use this vzd) and
`vz daemon listen` (the TLS API)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from vzkit.cli.checks import UsageError
from vzkit.cli.render import age_since, dump_json, dump_models, json_mode, key_values, table
from vzkit.sdk.client import Client

Handler = Callable[[argparse.Namespace, Client], int]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``30m``, ``12h``, ``7d`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if m is None:
        raise UsageError(
            f"invalid duration {text!r}", hint="give a number with s, m, h or d, e.g. 12h"
        )
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


# -- vz remote (no vzd involved) ---------------------------------------------------------------


def cmd_remote_add(args: argparse.Namespace) -> int:
    from vzkit.sdk.remotes import RemoteConfig

    config = RemoteConfig.load()
    if args.token:
        remote = config.add_with_bearer(
            args.name, args.target, args.token, args.fingerprint, args.accept_certificate
        )
    elif args.fingerprint or args.accept_certificate:
        raise UsageError(
            "--fingerprint and --accept-certificate go with --token",
            hint="a join token carries the fingerprint already",
        )
    else:
        remote = config.add_with_join_token(args.name, args.target)
    if json_mode(args):
        dump_json({"name": remote.name, "addresses": remote.addresses}, sys.stdout)
    else:
        sys.stdout.write(
            f"remote {remote.name!r} added ({remote.addresses[0]}, {remote.auth}); "
            f"use it with: vz --remote {remote.name} list\n"
        )
    return 0


def cmd_remote_list(args: argparse.Namespace) -> int:
    from vzkit.sdk.remotes import LOCAL, RemoteConfig

    config = RemoteConfig.load()
    rows = [(LOCAL, ["unix socket"], "-", "-")]
    rows += [(r.name, r.addresses, r.auth, r.ca_fingerprint) for r in config.remotes.values()]
    if json_mode(args):
        keys = ("name", "addresses", "auth", "ca_fingerprint")
        out = [dict(zip(keys, r, strict=True)) | {"default": r[0] == config.current} for r in rows]
        dump_json(out, sys.stdout)
        return 0
    table(
        ("NAME", "ADDRESS", "AUTH", "CA FINGERPRINT", "DEFAULT"),
        [
            (n, ", ".join(a), auth, fp[:16], "*" if n == config.current else "")
            for n, a, auth, fp in rows
        ],
        sys.stdout,
    )
    return 0


def cmd_remote_remove(args: argparse.Namespace) -> int:
    from vzkit.sdk.remotes import RemoteConfig

    RemoteConfig.load().remove(args.name)
    return 0


def cmd_remote_switch(args: argparse.Namespace) -> int:
    from vzkit.sdk.remotes import RemoteConfig

    RemoteConfig.load().switch(args.name)
    return 0


REMOTE_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "remote.add": cmd_remote_add,
    "remote.list": cmd_remote_list,
    "remote.remove": cmd_remote_remove,
    "remote.switch": cmd_remote_switch,
}


# -- vz trust / vz daemon listen ------------------------------------------------------------------


def cmd_trust_add(args: argparse.Namespace, client: Client) -> int:
    expires = parse_duration(args.expires) if args.expires else None
    created = client.add_trust(args.name, args.type, expires)
    if json_mode(args):
        sys.stdout.write(created.model_dump_json(indent=2) + "\n")
        return 0
    when = created.entry.expires_at
    until = f" (valid until {when.astimezone():%Y-%m-%d %H:%M})" if when else ""
    if args.type == "token":
        sys.stdout.write(
            f"bearer token for {args.name!r}{until}, shown only now:\n{created.token}\n"
            "send it as `Authorization: Bearer TOKEN`, or: "
            "vz remote add NAME ADDRESS --token TOKEN --fingerprint CA-FINGERPRINT\n"
        )
    else:
        sys.stdout.write(
            f"join token for {args.name!r}{until}, usable once:\n{created.token}\n"
            f"on the client: vz remote add NAME TOKEN\n"
        )
    return 0


def cmd_trust_list(args: argparse.Namespace, client: Client) -> int:
    entries = client.list_trust()
    if json_mode(args):
        dump_models(entries, sys.stdout)
        return 0
    rows = [
        (
            e.name,
            e.type.value,
            "join token unused" if e.pending else (e.fingerprint or "")[:16],
            age_since(e.created_at),
            e.expires_at.astimezone().strftime("%Y-%m-%d %H:%M") if e.expires_at else "never",
            age_since(e.last_used_at),
        )
        for e in entries
    ]
    table(("NAME", "TYPE", "FINGERPRINT", "AGE", "EXPIRES", "LAST USED"), rows, sys.stdout)
    return 0


def cmd_trust_remove(args: argparse.Namespace, client: Client) -> int:
    client.remove_trust(args.name)
    return 0


def cmd_daemon_listen(args: argparse.Namespace, client: Client) -> int:
    if args.address is None:
        info = client.server_config()
    else:
        off = args.address.lower() in ("off", "none", "")
        info = client.set_listen(None if off else args.address)
    if json_mode(args):
        dump_json(info, sys.stdout)
        return 0
    if not info.get("listen"):
        sys.stdout.write("the TLS API is off (turn it on: vz daemon listen :8443)\n")
        return 0
    key_values(
        [
            ("listen", info["listen"]),
            ("addresses", ", ".join(info.get("addresses") or []) or "(not listening)"),
            ("ca fingerprint", info.get("ca_fingerprint") or "-"),
        ],
        sys.stdout,
    )
    return 0


HANDLERS: dict[str, Handler] = {
    "trust.add": cmd_trust_add,
    "trust.list": cmd_trust_list,
    "trust.remove": cmd_trust_remove,
    "daemon.listen": cmd_daemon_listen,
}
