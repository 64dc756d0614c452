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
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, _cleanup, new_daemon, remove_cgroups
from tests.integration import icmp
from vzkit.api.instances import InstanceType
from vzkit.network._netns import entered
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


def ping(c: Client, name: str, target: str, tries: int = 4) -> tuple[int, str]:
    command = "ping -c 1 -W 2"
    if c.get_instance(name).type == InstanceType.CONTAINER:
        # No CAP_NET_RAW in a container, and busybox's ping needs it (icmp.py).
        if sh(c, name, f"test -x {icmp.PROBE_PATH}")[0] != 0:
            c.push_file(name, icmp.PROBE_PATH, icmp.probe(), mode=0o755)
        command = f"{icmp.PROBE_PATH} ping"
    # dnsmasq re-reads its hosts files on SIGHUP, asynchronously: allow a moment.
    script = f"for i in $(seq {tries}); do {command} {target} && exit 0; sleep 0.3; done; exit 1"
    return sh(c, name, script)


def connect(ns: str, host: str, port: int) -> bytes:
    # The server is an `nc -l` in a loop: between two connections it is briefly not there.
    for _ in range(20):
        try:
            with entered(ns):
                sock = socket.create_connection((host, port), timeout=5)
        except ConnectionRefusedError:
            time.sleep(0.1)
            continue
        with sock:
            sock.sendall(b"ping\n")
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(100)
    raise AssertionError(f"{host}:{port} refused every connection")


def serve(c: Client, name: str, port: int = 7000, reply: str = "hi-from-$(hostname)") -> None:
    """A TCP server in the instance that answers every connection with ``reply``."""
    code, out = sh(
        c,
        name,
        f"(while true; do echo {reply} | nc -l -p {port}; done) >/dev/null 2>&1 &",
    )
    assert code == 0, out


def own_links(ns: str, daemon: str) -> dict[str, str]:
    """The links in ``ns`` labelled with daemon identity ``daemon``: name -> alias."""
    found = json.loads(in_ns(ns, "ip", "-j", "link", "show"))
    prefix = f"vzkit@{daemon}:"
    return {x["ifname"]: x["ifalias"] for x in found if x.get("ifalias", "").startswith(prefix)}


def cgroup_of(pid: int) -> str:
    """The pid's cgroup path in the memory hierarchy (v1) or the unified one (v2)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    by_ctl = {f.split(":")[1]: f.split(":", 2)[2] for f in lines}
    return by_ctl.get("memory") or by_ctl.get("", "")


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


@contextlib.contextmanager
def uplinked(tag: str) -> Iterator[tuple[str, str]]:
    """A namespace standing in for the host (``vzt-TAG``) with a default route into a
    second one standing in for the internet (``vzw-TAG``); both gone at the end, with every
    process in them (dnsmasq outlives vzd)."""
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
        yield ns, world


def _join(d: Daemon, ns: str, world: str, default_network: str = "vzbr0") -> None:
    d.netns = ns
    d.world = world
    d.env["VZ_DEFAULT_NETWORK"] = default_network


@pytest.fixture
def netd(private_daemon: Daemon) -> Iterator[Daemon]:
    """A private vzd in its own namespace, default network vzbr0, uplink to ``world``."""
    with uplinked(uuid.uuid4().hex[:8]) as (ns, world):
        _join(private_daemon, ns, world)
        try:
            private_daemon.start()
            yield private_daemon
        finally:
            # Instances first, through the daemon: containers' inits are in namespaces of
            # their own, which deleting ours would not reach.
            _cleanup(private_daemon)


@pytest.fixture
def daemon_pair(image_cache: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """Two daemons (state dirs) in ONE namespace and one cgroup parent, as two vzd on one
    host would be; both want the default network vzbr0. Not started."""
    tag = uuid.uuid4().hex[:8]
    parent = f"vzkit-test-pair-{tag}"
    try:
        with (
            uplinked(tag) as (ns, world),
            new_daemon(image_cache, parent) as a,
            new_daemon(image_cache, parent) as b,
        ):
            _join(a, ns, world)
            _join(b, ns, world)
            yield a, b
    finally:
        remove_cgroups(parent)
