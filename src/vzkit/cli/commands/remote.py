"""`vz remote` (this client's remotes, no vzd involved) and `vz trust` (who may use this vzd
over TLS)."""

from __future__ import annotations

import argparse
import re
import sys

from vzkit.cli.base import CommandSet, bind_local, subcommands
from vzkit.cli.checks import UsageError
from vzkit.cli.render import age_since, dump_json, dump_models, json_mode, table
from vzkit.sdk.client import Client

commands = CommandSet()
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


@commands.add("remote", "other hosts' vzd, reached over TLS")
def _remote(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "remote_cmd", "add|list|remove|switch")
    ra = sub.add("add", "add a remote: NAME JOIN-TOKEN, or NAME ADDRESS --token BEARER")
    ra.add_argument("name")
    ra.add_argument("target", metavar="TOKEN|ADDRESS")
    ra.add_argument("--token", help="a bearer token (from: vz trust add NAME --type token)")
    ra.add_argument("--fingerprint", help="the server CA's SHA-256 (with --token)")
    ra.add_argument(
        "--accept-certificate",
        action="store_true",
        help="trust the CA the server presents, unchecked (with --token)",
    )
    bind_local(ra, cmd_remote_add)
    bind_local(sub.add("list", "list remotes"), cmd_remote_list)
    rr = sub.add("remove", "forget a remote")
    rr.add_argument("name")
    bind_local(rr, cmd_remote_remove)
    rs = sub.add("switch", "make a remote the default ('local': this host)")
    rs.add_argument("name")
    bind_local(rs, cmd_remote_switch)


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


# -- vz trust ---------------------------------------------------------------------------------


@commands.add("trust", "who may use this vzd over TLS")
def _trust(p: argparse.ArgumentParser) -> None:
    sub = subcommands(p, "trust_cmd", "add|list|remove")
    ta = sub.add("add", "make a join token (or, --type token, a bearer token)", cmd_trust_add)
    ta.add_argument("name")
    ta.add_argument("--type", choices=["certificate", "token"], default="certificate")
    ta.add_argument(
        "--expires",
        metavar="DURATION",
        help="e.g. 30m, 12h, 7d (default: a join token lasts 1d, a bearer token forever)",
    )
    sub.add("list", "list trusted clients", cmd_trust_list)
    sub.add("remove", "revoke at once", cmd_trust_remove).add_argument("name")


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
