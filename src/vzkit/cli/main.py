"""``vz``: parse the command line, call the SDK, render. Kept import-light for start-up time."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from vzkit.errors import VzError

_TAKES_COMMAND = {"run", "exec"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\nhint: see: {self.prog} --help\n")
        sys.exit(2)


def _globals(defaults: bool) -> _Parser:
    # Shared by the top parser and every subcommand so `vz list --format json` works too;
    # subcommands use SUPPRESS so they do not reset a value given before the subcommand.
    p = _Parser(add_help=False)
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
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


def _instance_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--type", choices=["microvm", "vm", "container"], default=None, help="default: microvm"
    )
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--memory", default=None, metavar="SIZE", help="e.g. 512MiB, 1G (bare = MiB)")
    p.add_argument("--accel", choices=["kvm", "tcg"], default=None)
    p.add_argument(
        "--cpu-weight",
        type=int,
        default=None,
        metavar="N",
        help="relative CPU share against other instances, 1-10000 (default 100)",
    )
    p.add_argument(
        "--cpu-pin", default=None, metavar="LIST", help="host CPUs to run on, e.g. 0,2-3"
    )
    p.add_argument(
        "--network",
        action="append",
        metavar="NAME[,ip=ADDR][,mac=MAC]",
        help="attach to a network (repeatable: eth0, eth1, ...; default: vzbr0; 'none': no "
        "network)",
    )
    p.add_argument(
        "--volume",
        action="append",
        metavar="[POOL/]NAME[:PATH][:ro]",
        help="attach a volume (containers: mounted at PATH)",
    )
    p.add_argument(
        "-p",
        "--port",
        action="append",
        metavar="HOSTPORT:PORT[/PROTO]",
        help="forward a host port to the instance (repeatable)",
    )
    p.add_argument(
        "--privileged",
        action="store_true",
        help="containers: run as host root, without a user namespace (not recommended)",
    )


def _exec_opts(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    g = _globals(False)
    top = _Parser(prog="vz", description="vzkit: micro-VMs and VMs", parents=[_globals(True)])
    sub = top.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help, parents=[g])
        return parser

    p = add("run", "run a command in a fresh ephemeral instance")
    p.add_argument("image", nargs="?", help="the image (not with --from)")
    p.add_argument(
        "--from",
        dest="source",
        metavar="INSTANCE/SNAPSHOT",
        help="start from a stateful snapshot's memory instead of booting (warm start)",
    )
    p.add_argument("--name", default=None)
    _instance_opts(p)
    _exec_opts(p)
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--rm", dest="keep", action="store_false", help="delete it (default)")
    keep.add_argument("--keep", dest="keep", action="store_true", help="leave it running")
    p.set_defaults(keep=False)

    p = add("launch", "create and start an instance")
    p.add_argument("image")
    p.add_argument("name", nargs="?")
    _instance_opts(p)

    add("list", "list instances")
    add("info", "show an instance").add_argument("name")

    p = add("exec", "run a command in an instance")
    p.add_argument("name")
    _exec_opts(p)

    add("shell", "open a shell in an instance").add_argument("name")

    p = add("console", "attach to the serial console (Ctrl-] detaches)")
    p.add_argument("name")
    p.add_argument("--show-log", action="store_true", help="print the console log and exit")

    p = add("file", "copy files to and from an instance")
    fsub = p.add_subparsers(dest="file_cmd", metavar="push|pull", parser_class=_Parser)
    fsub.required = True
    fp = fsub.add_parser("push", help="copy LOCAL (- = stdin) to NAME:/path", parents=[g])
    fp.add_argument("local")
    fp.add_argument("remote", metavar="NAME:/path")
    fp.add_argument("--mode", default=None, help="octal, default: the local file's")
    fp.add_argument("-p", "--parents", action="store_true", help="create missing directories")
    fp = fsub.add_parser("pull", help="copy NAME:/path to LOCAL (- = stdout)", parents=[g])
    fp.add_argument("remote", metavar="NAME:/path")
    fp.add_argument("local")

    for action in ("start", "stop", "restart", "pause", "resume"):
        p = add(action, f"{action} instances")
        p.add_argument("names", nargs="+", metavar="NAME")
        if action in ("stop", "restart"):
            p.add_argument("--force", action="store_true", help="kill instead of a clean stop")
            p.add_argument("--timeout", type=float, default=30.0, metavar="S")

    p = add("delete", "delete instances")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--force", action="store_true", help="kill running instances")

    p = add("config", "show or change an instance's limits")
    csub = p.add_subparsers(dest="config_cmd", metavar="show|set", parser_class=_Parser)
    csub.required = True
    csub.add_parser("show", help="show the limits", parents=[g]).add_argument("name")
    cp = csub.add_parser("set", help="change limits (live where possible)", parents=[g])
    cp.add_argument("name")
    cp.add_argument(
        "settings",
        nargs="+",
        metavar="KEY=VALUE",
        help="limits.cpus, limits.memory, limits.cpu_weight, limits.cpu_pin, limits.processes",
    )

    p = add("network", "manage virtual networks")
    nsub = p.add_subparsers(
        dest="network_cmd",
        metavar="create|list|show|set|delete|attach|detach",
        parser_class=_Parser,
    )
    nsub.required = True
    np_ = nsub.add_parser("create", help="create a network", parents=[g])
    np_.add_argument("name")
    np_.add_argument("--subnet", help="IPv4 CIDR, e.g. 10.90.0.0/24 (default: a free /24)")
    np_.add_argument("--isolated", action="store_true", help="no NAT, no route out")
    np_.add_argument("--domain", help="DNS domain for instance names (default: vz)")
    nsub.add_parser("list", help="list networks", parents=[g])
    nsub.add_parser("show", help="show a network", parents=[g]).add_argument("name")
    nsub.add_parser("delete", help="delete a network", parents=[g]).add_argument("name")
    sp = nsub.add_parser("set", help="change a network", parents=[g])
    sp.add_argument("name")
    sp.add_argument("settings", nargs="+", metavar="KEY=VALUE", help="isolated, dns_domain")
    ap = nsub.add_parser("attach", help="give an instance an interface", parents=[g])
    ap.add_argument("instance")
    ap.add_argument("network")
    ap.add_argument("--ip", help="static address (default: a free one)")
    ap.add_argument("--mac", help="MAC address (default: stable per instance)")
    dp = nsub.add_parser("detach", help="remove an instance's interface", parents=[g])
    dp.add_argument("instance")
    dp.add_argument("network")

    p = add("snapshot", "snapshots of an instance")
    ssub = p.add_subparsers(
        dest="snapshot_cmd", metavar="create|list|info|restore|delete", parser_class=_Parser
    )
    ssub.required = True
    sc = ssub.add_parser("create", help="take a snapshot", parents=[g])
    sc.add_argument("instance")
    sc.add_argument("snapshot", nargs="?", help="its name (default: snap0, snap1, ...)")
    sc.add_argument("--stateful", action="store_true", help="also save the running memory (VMs)")
    ssub.add_parser("list", help="list snapshots", parents=[g]).add_argument("instance")
    for verb, text in (
        ("info", "show a snapshot"),
        ("restore", "go back to a snapshot (a running instance is restarted)"),
        ("delete", "delete a snapshot"),
    ):
        sp_ = ssub.add_parser(verb, help=text, parents=[g])
        sp_.add_argument("instance")
        sp_.add_argument("snapshot")

    from vzkit.cli import storecmds  # the client is imported for every command anyway

    storecmds.add_parsers(add, g, _Parser)

    p = add("copy", "copy an instance (copy-on-write: instant)")
    p.add_argument("source")
    p.add_argument("target")

    p = add("export", "write an instance (disks, files, snapshots) to an archive")
    p.add_argument("instance")
    p.add_argument("file", help="the archive to write ('-': standard output)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    p = add("import", "create an instance from an archive made by vz export")
    p.add_argument("file", help="the archive ('-': standard input)")
    p.add_argument("--name", help="a new name (default: the exported one)")

    p = add("monitor", "print lifecycle events as they happen")
    p.add_argument("--type", help="only these event types, comma-separated")

    p = add("top", "instances' CPU, memory, disk and network use, live")
    p.add_argument("--interval", type=float, default=2.0, metavar="S")
    p.add_argument("--once", action="store_true", help="print once and exit")

    p = add("publish", "turn a VM's disk into a new image")
    p.add_argument("instance")
    p.add_argument("image")

    p = add("port", "forward host ports to instances")
    psub = p.add_subparsers(dest="port_cmd", metavar="add|list|remove", parser_class=_Parser)
    psub.required = True
    pp = psub.add_parser("add", help="forward a host port", parents=[g])
    pp.add_argument("instance")
    pp.add_argument("spec", metavar="HOSTPORT:PORT[/tcp|udp]")
    pl = psub.add_parser("list", help="list port forwards", parents=[g])
    pl.add_argument("instance", nargs="?")
    pr = psub.add_parser("remove", help="remove a port forward", parents=[g])
    pr.add_argument("instance")
    pr.add_argument("spec", metavar="HOSTPORT[/tcp|udp]")

    p = add("firewall", "instances' ingress allow-lists (nftables)")
    fsub = p.add_subparsers(
        dest="firewall_cmd", metavar="add|list|remove|deny-all|open", parser_class=_Parser
    )
    fsub.required = True
    fp = fsub.add_parser(
        "add", help="allow ingress (from the first rule on, the rest is dropped)", parents=[g]
    )
    fp.add_argument("instance")
    fp.add_argument("--source", default="0.0.0.0/0", metavar="CIDR", help="allowed sources")
    fp.add_argument("--proto", choices=["tcp", "udp"], help="only this protocol")
    fp.add_argument("--port", type=int, help="only this destination port (needs --proto)")
    fsub.add_parser("list", help="show the allow-list", parents=[g]).add_argument("instance")
    fr = fsub.add_parser("remove", help="remove a rule by its number", parents=[g])
    fr.add_argument("instance")
    fr.add_argument("index", type=int, metavar="N")
    fsub.add_parser(
        "deny-all", help="drop all ingress (an empty allow-list)", parents=[g]
    ).add_argument("instance")
    fsub.add_parser(
        "open", help="remove the allow-list: let everything in", parents=[g]
    ).add_argument("instance")

    p = add("image", "manage images")
    isub = p.add_subparsers(
        dest="image_cmd", metavar="list|info|build|delete", parser_class=_Parser
    )
    isub.required = True
    isub.add_parser("list", help="list built images", parents=[g])
    isub.add_parser("info", help="show an image", parents=[g]).add_argument("name")
    ip = isub.add_parser("build", help="build an image", parents=[g])
    ip.add_argument("name")
    ip.add_argument("--force", action="store_true", help="rebuild even if built")
    isub.add_parser("delete", help="delete an image", parents=[g]).add_argument("name")

    p = add("host", "the host")
    hsub = p.add_subparsers(dest="host_cmd", metavar="info", parser_class=_Parser)
    hsub.required = True
    hp = hsub.add_parser("info", help="host capabilities", parents=[g])
    hp.add_argument("--refresh", action="store_true", help="probe again")

    p = add("daemon", "control vzd")
    dsub = p.add_subparsers(
        dest="daemon_cmd", metavar="start|stop|status|listen", parser_class=_Parser
    )
    dsub.required = True
    for name in ("start", "stop", "status"):
        dsub.add_parser(name, help=f"{name} vzd", parents=[g])
    dl = dsub.add_parser("listen", help="serve the API over TLS (show, set, or off)", parents=[g])
    dl.add_argument("address", nargs="?", metavar="HOST:PORT|:PORT|off")

    p = add("remote", "other hosts' vzd, reached over TLS")
    rsub = p.add_subparsers(
        dest="remote_cmd", metavar="add|list|remove|switch", parser_class=_Parser
    )
    rsub.required = True
    ra = rsub.add_parser(
        "add",
        help="add a remote: NAME JOIN-TOKEN, or NAME ADDRESS --token BEARER",
        parents=[g],
    )
    ra.add_argument("name")
    ra.add_argument("target", metavar="TOKEN|ADDRESS")
    ra.add_argument("--token", help="a bearer token (from: vz trust add NAME --type token)")
    ra.add_argument("--fingerprint", help="the server CA's SHA-256 (with --token)")
    ra.add_argument(
        "--accept-certificate",
        action="store_true",
        help="trust the CA the server presents, unchecked (with --token)",
    )
    rsub.add_parser("list", help="list remotes", parents=[g])
    rsub.add_parser("remove", help="forget a remote", parents=[g]).add_argument("name")
    rsub.add_parser(
        "switch", help="make a remote the default ('local': this host)", parents=[g]
    ).add_argument("name")

    p = add("trust", "who may use this vzd over TLS")
    tsub = p.add_subparsers(dest="trust_cmd", metavar="add|list|remove", parser_class=_Parser)
    tsub.required = True
    ta = tsub.add_parser(
        "add", help="make a join token (or, --type token, a bearer token)", parents=[g]
    )
    ta.add_argument("name")
    ta.add_argument("--type", choices=["certificate", "token"], default="certificate")
    ta.add_argument(
        "--expires",
        metavar="DURATION",
        help="e.g. 30m, 12h, 7d (default: a join token lasts 1d, a bearer token forever)",
    )
    tsub.add_parser("list", help="list trusted clients", parents=[g])
    tsub.add_parser("remove", help="revoke at once", parents=[g]).add_argument("name")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from vzkit.cli import commands

        return commands.dispatch(args)
    except VzError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        from vzkit.cli.checks import UsageError
        from vzkit.cli.commands import print_error

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
