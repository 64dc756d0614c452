"""Run a block of code inside another network namespace (this thread only).

Every public function of the network package takes an optional ``netns``: None means the
caller's own namespace (the daemon's host namespace), a str names /var/run/netns/NAME, an
int is a pid (its /proc/PID/ns/net), a Path is any nsfs file. Switching the calling thread
with setns(2) makes netlink sockets, /proc/sys/net writes and child processes (nft,
dnsmasq) all land in that namespace, with one mechanism instead of three.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vzkit.errors import HostUnsupported, NotFound

NetnsRef = str | int | Path | None

NETNS_RUN_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str | int | Path) -> Path:
    if isinstance(netns, Path):
        return netns
    if isinstance(netns, int):
        return Path(f"/proc/{netns}/ns/net")
    return NETNS_RUN_DIR / netns


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise HostUnsupported(
            f"setns({what}, CLONE_NEWNET) failed: {os.strerror(err)}",
            hint="network namespaces need root (CAP_SYS_ADMIN)",
        )


@contextmanager
def entered(netns: NetnsRef) -> Iterator[None]:
    """Switch this thread into ``netns`` for the block; a no-op for None."""
    if netns is None:
        yield
        return
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(
            f"network namespace {path} does not exist",
            hint="is the instance running? (its namespace goes with its last process)",
        ) from exc
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, str(path))
        try:
            yield
        finally:
            # Going home must not fail silently: a thread left in the wrong namespace
            # would make every later netlink call act on the wrong links.
            _setns(home, "/proc/thread-self/ns/net")
    finally:
        os.close(target)
        os.close(home)


def write_sysctl(key: str, value: str, netns: NetnsRef = None) -> str | None:
    """Set a /proc/sys value (dots as separators) and return the previous one.

    Returns None if the key does not exist (for example a bridge not created yet).
    """
    path = Path("/proc/sys") / key.replace(".", "/")
    with entered(netns):
        try:
            old = path.read_text().strip()
        except FileNotFoundError:
            return None
        if old != value:
            path.write_text(value + "\n")
    return old


def read_sysctl(key: str, netns: NetnsRef = None) -> str | None:
    path = Path("/proc/sys") / key.replace(".", "/")
    with entered(netns):
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            return None
