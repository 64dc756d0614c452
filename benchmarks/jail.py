"""What QEMU's jail costs per launch: the launcher with the jail (a root of its own built
from bind mounts, pivot_root, the user switch) against the same launcher without it
(VZ_JAIL=0), both starting the same daemonizing QEMU with no guest.

The peer is the launch without the jail, measured interleaved in the same run; the ratio
is jailed over unjailed (medians). Needs root and the vz-qemu user (scripts/setup).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import sys
import tempfile
from pathlib import Path

# Run as a file (python benchmarks/jail.py): the imports below need the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median
from vzkit.engines.qemu import process
from vzkit.settings import Settings


async def _launch_once(qemu: str, work: Path, jail: process.Jail | None) -> float:
    pid_file = work / "qemu.pid"
    argv = [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    argv += ["-daemonize", "-pidfile", str(pid_file)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    pid = await process.launch(
        argv, pass_fds=[], procs_files=[], pid_file=pid_file, log_file=work / "qemu.log", jail=jail
    )
    took = loop.time() - start
    process.kill(pid)
    await asyncio.to_thread(process.wait_gone, pid, 10.0)
    return took


async def _run(runs: int) -> tuple[list[float], list[float]]:
    qemu = Settings().qemu_binary
    entry = pwd.getpwnam("vz-qemu")
    with tempfile.TemporaryDirectory(prefix="vzb-jail-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        os.chown(work, entry.pw_uid, entry.pw_gid)
        jail = process.Jail(keep=((work, False),), user=(entry.pw_uid, entry.pw_gid))
        await _launch_once(qemu, work, jail)  # warm the page cache for both
        jailed: list[float] = []
        free: list[float] = []
        for _ in range(runs):
            jailed.append(await _launch_once(qemu, work, jail))
            free.append(await _launch_once(qemu, work, None))
    return jailed, free


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=15)
    args = parser.parse_args()
    jailed, free = asyncio.run(_run(args.runs))
    j, f = median(jailed), median(free)
    print(f"launch without the jail  median {f * 1000:.1f} ms")
    print(f"launch in the jail       median {j * 1000:.1f} ms")
    print(f"ratio jailed/unjailed: {j / f:.2f} (added {(j - f) * 1000:.1f} ms per start)")


if __name__ == "__main__":
    main()
