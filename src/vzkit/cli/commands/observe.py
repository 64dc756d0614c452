"""`vz monitor` (lifecycle events) and `vz top` (usage)."""

from __future__ import annotations

import argparse
import sys

from vzkit.cli.base import CommandSet, bind
from vzkit.cli.render import dump_models, format_size, json_mode, table
from vzkit.sdk.client import Client

commands = CommandSet()


@commands.add("monitor", "print lifecycle events as they happen")
def _monitor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--type", help="only these event types, comma-separated")
    bind(p, cmd_monitor)


def cmd_monitor(args: argparse.Namespace, client: Client) -> int:
    """Print lifecycle events as they happen, one line each (JSON lines with --format json)."""
    types = [t for t in (args.type or "").split(",") if t] or None
    for event in client.events(types):
        if json_mode(args):
            sys.stdout.write(event.model_dump_json() + "\n")
        else:
            details = " ".join(f"{k}={v}" for k, v in event.data.items() if v is not None)
            when = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
            sys.stdout.write(f"{when} {event.type:<18} {event.instance or '-':<16} {details}\n")
        sys.stdout.flush()
    return 0


@commands.add("top", "instances' CPU, memory, disk and network use, live")
def _top(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=2.0, metavar="S")
    p.add_argument("--once", action="store_true", help="print once and exit")
    bind(p, cmd_top)


def cmd_top(args: argparse.Namespace, client: Client) -> int:
    """Instances' usage, refreshed every --interval seconds (once with --once)."""
    import time

    prev: dict[str, tuple[float, float]] = {}
    interactive = sys.stdout.isatty() and not args.once and not json_mode(args)
    while True:
        now = time.monotonic()
        stats = client.stats()
        if json_mode(args):
            dump_models(stats, sys.stdout)
        else:
            rows = []
            for s in stats:
                cpu = "-"
                if s.cpu_seconds is not None and s.name in prev:
                    t0, c0 = prev[s.name]
                    cpu = f"{100 * (s.cpu_seconds - c0) / max(now - t0, 1e-6):.1f}%"
                if s.cpu_seconds is not None:
                    prev[s.name] = (now, s.cpu_seconds)

                def size(v: int | None) -> str:
                    return "-" if v is None else format_size(v)

                rows.append(
                    (
                        s.name, s.type, s.state, cpu, size(s.memory_bytes),
                        size(s.disk_read_bytes), size(s.disk_write_bytes),
                        size(s.net_rx_bytes), size(s.net_tx_bytes),
                    )
                )  # fmt: skip
            if interactive:
                sys.stdout.write("\x1b[H\x1b[2J")
            head = (
                "NAME",
                "TYPE",
                "STATE",
                "CPU",
                "MEMORY",
                "DISK R",
                "DISK W",
                "NET RX",
                "NET TX",
            )
            table(head, rows, sys.stdout)
        sys.stdout.flush()
        if args.once or json_mode(args):
            return 0
        time.sleep(args.interval)
