"""Shared benchmark plumbing: a private vzd in temporary directories and timing helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vzkit.host import cgroups
from vzkit.sdk.client import Client

VZ = [sys.executable, "-m", "vzkit.cli.main"]


@contextlib.contextmanager
def private_daemon(
    netns: str | None = None, **extra_env: str
) -> Iterator[tuple[dict[str, str], Client]]:
    """Start vzd with its own state so a benchmark never touches the user's instances.

    With ``netns``, vzd runs inside the existing network namespace /var/run/netns/NETNS
    (entered with nsenter, not ``ip netns exec``, which remounts /sys and hides cgroups);
    only there may it have a default network. In the host's namespace it touches nothing of
    the host's own vzd: its links, tables and cgroups carry its own daemon identity.
    """
    root = Path(tempfile.mkdtemp(prefix="vzb-"))
    root.chmod(0o755)  # QEMU's unprivileged user must be able to pass
    env = dict(os.environ)
    env.update(
        VZ_STATE_DIR=str(root / "state"),
        VZ_RUNTIME_DIR=str(root / "run"),
        VZ_CACHE_DIR=os.environ.get("VZ_CACHE_DIR", str(root / "cache")),
        VZ_CGROUP_PARENT=f"vzkit-bench-{root.name}",
        # No bridge on the host unless a benchmark asks for one (in a namespace of its own).
        VZ_DEFAULT_NETWORK="none",
    )
    env.update(extra_env)
    env.pop("VZ_SOCKET", None)
    if netns is None and env["VZ_DEFAULT_NETWORK"].lower() != "none":
        raise ValueError("a benchmark's vzd with a network runs in a namespace of its own: netns=")
    log = open(root / "vzd.log", "ab")  # noqa: SIM115 - the daemon keeps it
    enter = [] if netns is None else ["nsenter", f"--net=/var/run/netns/{netns}"]
    proc = subprocess.Popen(
        [*enter, sys.executable, "-m", "vzkit.server.main"],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    sock = root / "run" / "vzd.sock"
    client = Client(sock, autostart=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.server_info()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((root / "vzd.log").read_text()[-2000:]) from None
                time.sleep(0.05)
        yield env, client
    finally:
        with contextlib.suppress(Exception):
            for inst in client.list_instances():
                client.delete_instance(inst.name, force=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        cg = cgroups.detect().open(env["VZ_CGROUP_PARENT"])
        if cg is not None:
            cg.destroy(timeout=5.0)
        shutil.rmtree(root, ignore_errors=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
