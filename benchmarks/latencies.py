"""Latencies the test suite no longer caps (its tests assert the property; the numbers live
here), each against a named peer measured in the same run. Medians; ratio = ours / peer.

* crash noticed: a micro-VM's QEMU, and a container's init, killed from outside, until vzd
  has recorded `crashed` (its database polled every millisecond), against the floor: a
  pidfd of a plain `sleep` becoming readable after the same SIGKILL.
* host probe: cold (`probe_host`, refresh) against `qemu-system --version` (one process
  the cold probe runs); cached against reading and parsing its cache file; and the KVM
  ring-0 measurement alone, where /dev/kvm can be opened.
* guest agent, run on the host over a socketpair (as tests/integration/test_agent_local.py
  does): an exec with a 0.3 s timeout until its result, against coreutils
  `timeout -s KILL 0.3 sleep`; an exec leaving a background grandchild that holds the
  output open, against the same exec without it; ten concurrent execs, against the same
  ten commands as plain subprocesses.
* image store: the cheap check run at every launch against the full re-hash, on a real
  `minimal` image.

Needs root (the daemon) and busybox; `--skip-daemon` leaves out the crash rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

# Run as a file (the README's `.venv/bin/python benchmarks/boot.py`), only benchmarks/ is on
# sys.path: the imports below need the repository root there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, private_daemon, timed
from vzkit.engines.qemu.agent import AgentClient
from vzkit.guest.build import agent_binary
from vzkit.host.kvm import measure_ring0
from vzkit.host.probe import CACHE_FILE, probe_host
from vzkit.images.store import ImageStore
from vzkit.settings import Settings


def row(what: str, ours: list[float], peer_name: str, peer: list[float]) -> None:
    o, p = median(ours), median(peer)
    print(
        f"{what:<44} {o * 1000:9.2f} ms   {peer_name:<36} {p * 1000:9.2f} ms   ratio {o / p:8.2f}"
    )


# ---------------------------------------------------------------------------- crashes


def _pidfd_floor() -> float:
    proc = subprocess.Popen(["sleep", "1000"])
    fd = os.pidfd_open(proc.pid)
    try:
        start = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        select.select([fd], [], [])
        return time.perf_counter() - start
    finally:
        os.close(fd)
        proc.wait()


def _recorded_state(db: sqlite3.Connection, name: str) -> str:
    # The table itself, not vzkit's Database: that caches rows it has read once.
    row = db.execute("SELECT state FROM instances WHERE name = ?", (name,)).fetchone()
    return str(row[0]) if row else "gone"


def crash_noticed(runs: int) -> None:
    floor = [_pidfd_floor() for _ in range(runs)]
    with private_daemon() as (env, client):
        path = Path(env["VZ_STATE_DIR"]) / "vzkit.db"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            for kind in ("microvm", "container"):
                limits = {"cpus": 1, "memory": "256MiB"}
                client.create_instance({"name": kind, "type": kind, "limits": limits})
                times = []
                for _ in range(runs):
                    pid = client.get_instance(kind).pid
                    assert pid
                    start = time.perf_counter()
                    os.kill(pid, signal.SIGKILL)
                    while (state := _recorded_state(db, kind)) != "crashed":
                        if time.perf_counter() - start > 120:
                            raise RuntimeError(f"{kind} killed: still {state} after 120 s")
                        time.sleep(0.001)
                    times.append(time.perf_counter() - start)
                    client.start(kind)
                row(f"{kind} killed: recorded crashed", times, "pidfd of a killed sleep", floor)
        finally:
            db.close()


# ---------------------------------------------------------------------------- host probe


def host_probe(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(runtime_dir=Path(tmp), accel=None)
        cold = [timed(lambda: probe_host(settings, refresh=True)) for _ in range(runs)]
        cached = [timed(lambda: probe_host(settings)) for _ in range(runs)]
        cache = Path(tmp) / CACHE_FILE
        parse = [timed(lambda: json.loads(cache.read_text())) for _ in range(runs)]
    qemu = [settings.qemu_binary, "--version"]
    version = [
        timed(lambda: subprocess.run(qemu, capture_output=True, check=True)) for _ in range(runs)
    ]
    row("host probe, cold", cold, "qemu-system --version", version)
    row("host probe, cached", cached, "read + parse of the cache file", parse)
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        ring0 = [timed(measure_ring0) for _ in range(runs)]
        row("KVM ring-0 measurement", ring0, "qemu-system --version", version)


# ---------------------------------------------------------------------------- guest agent


@contextlib.asynccontextmanager
async def _local_agent(binary: Path) -> AsyncIterator[AgentClient]:
    host, guest = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [str(binary), "--fd", str(guest.fileno()), "--no-poweroff"],
            pass_fds=(guest.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    finally:
        guest.close()
    try:
        reader, writer = await asyncio.open_connection(sock=host)
        client = await AgentClient.open(reader, writer, timeout=30)
        try:
            yield client
        finally:
            await client.close()
    finally:
        proc.terminate()  # the agent kills its sessions' process groups on SIGTERM
        proc.wait(30)
        host.close()


async def _atimed(call: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def _agent_rows(binary: Path, runs: int) -> None:
    async with _local_agent(binary) as agent:

        async def killed_by_timeout() -> None:
            session = await agent.exec(["sleep", "100"], timeout=0.3)
            assert (await session.wait()).timed_out

        async def exit_with(script: str) -> None:
            session = await agent.exec(["sh", "-c", script])
            await session.wait()
            if session.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(session.pid, signal.SIGKILL)

        script = "sleep 0.2; head -c 100000 /dev/zero"

        async def ten_execs() -> None:
            await asyncio.gather(*(agent.run(["sh", "-c", script]) for _ in range(10)))

        async def ten_processes() -> None:
            async def one() -> None:
                proc = await asyncio.create_subprocess_exec(
                    "sh", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                await proc.communicate()

            await asyncio.gather(*(one() for _ in range(10)))

        async def coreutils_timeout() -> None:
            cmd = ["timeout", "-s", "KILL", "0.3", "sleep", "100"]
            await asyncio.to_thread(subprocess.run, cmd, check=False)

        Call = Callable[[], Awaitable[object]]
        pairs: list[tuple[str, Call, str, Call]] = [
            (
                "agent: exec killed by its 0.3 s timeout",
                killed_by_timeout,
                "timeout -s KILL 0.3 sleep",
                coreutils_timeout,
            ),
            (
                "agent: exec leaving a background grandchild",
                lambda: exit_with("sleep 30 & echo started"),
                "the same exec without it",
                lambda: exit_with("echo started"),
            ),
            ("agent: ten concurrent execs", ten_execs, "ten plain subprocesses", ten_processes),
        ]
        samples: list[tuple[list[float], list[float]]] = [([], []) for _ in pairs]
        for _ in range(runs):  # interleaved, so drift in machine load hits both alike
            for (_, ours, _, peer), (mine, theirs) in zip(pairs, samples, strict=True):
                mine.append(await _atimed(ours))
                theirs.append(await _atimed(peer))
    for (what, _, peer_name, _), (mine, theirs) in zip(pairs, samples, strict=True):
        row(what, mine, peer_name, theirs)


def guest_agent(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        binary = agent_binary(Settings(cache_dir=Path(tmp)))
        asyncio.run(_agent_rows(binary, runs))


# ---------------------------------------------------------------------------- image store


def image_check(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=Path(tmp) / "state", cache_dir=Path(tmp) / "cache")
        store = ImageStore(settings)
        info = store.build("minimal")
        size = sum(Path(p).stat().st_size for r, p in info.files.items() if Path(p).is_file())
        cheap = [timed(lambda: store.check(info)) for _ in range(runs)]
        full = [timed(lambda: store.check(info, full=True)) for _ in range(runs)]
    row(f"image check at launch ({size / 2**20:.0f} MiB image)", cheap, "full re-hash", full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--skip-daemon", action="store_true")
    args = parser.parse_args()
    host_probe(args.runs)
    image_check(args.runs)
    guest_agent(args.runs)
    if not args.skip_daemon:
        crash_noticed(args.runs)


if __name__ == "__main__":
    main()
