"""vzd inside a network namespace of the test's own, with an "outside world" namespace.

The daemon's namespace stands in for the host: its bridges, nft table and dnsmasq live
and die there. ``world`` is a second namespace joined to it by a veth pair and holding the
daemon namespace's default route, so "reaching the outside" (NAT) can be tested without a
packet leaving the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, _cleanup
from vzkit.sdk.client import Client

UPLINK = "10.255.0.1"  # the daemon namespace's end of the uplink
OUTSIDE = "10.255.0.2"  # an address "on the internet"


def in_ns(ns: str, *argv: str, check: bool = True) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check, timeout=30
    ).stdout


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def dnsmasq_pids(d: Daemon) -> list[int]:
    """The dnsmasq processes in the daemon's namespace."""
    assert d.netns
    pids = []
    for pid in ns_pids(d.netns):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq":
                pids.append(pid)
    return pids


def vz_links(ns: str) -> list[str]:
    """Interfaces vzkit made in ``ns`` (names start with vz)."""
    links = json.loads(in_ns(ns, "ip", "-j", "link", "show"))
    return sorted(link["ifname"] for link in links if link["ifname"].startswith("vz"))


def sh(c: Client, name: str, script: str, timeout: float = 30) -> tuple[int, str]:
    """Run ``sh -c script`` in an instance: exit code and stdout+stderr."""
    res, out, err = c.exec_capture(name, ["sh", "-c", script], timeout=timeout)
    return res.exit_code, (out + err).decode(errors="replace")


def _kill_all(ns: str) -> None:
    for pid in ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def namespace(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        in_ns(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        _kill_all(name)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netd(private_daemon: Daemon) -> Iterator[Daemon]:
    """A private vzd in its own namespace, default network vzbr0, uplink to ``world``."""
    tag = uuid.uuid4().hex[:8]
    with namespace(f"vzt-{tag}") as ns, namespace(f"vzw-{tag}") as world:
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                "up0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "wan0",
                "netns",
                world,
            ],
            check=True,
        )
        in_ns(ns, "ip", "addr", "add", f"{UPLINK}/30", "dev", "up0")
        in_ns(ns, "ip", "link", "set", "up0", "up")
        in_ns(ns, "ip", "route", "add", "default", "via", OUTSIDE)
        in_ns(world, "ip", "addr", "add", f"{OUTSIDE}/30", "dev", "wan0")
        in_ns(world, "ip", "link", "set", "wan0", "up")
        private_daemon.netns = ns
        private_daemon.world = world
        private_daemon.env["VZ_DEFAULT_NETWORK"] = "vzbr0"
        try:
            private_daemon.start()
            yield private_daemon
        finally:
            # Instances first, through the daemon: containers' inits are in namespaces of
            # their own, which deleting ours would not reach.
            _cleanup(private_daemon)
