"""Warm starts, copies and stateful snapshots, each against its peer in the same run.

* Warm start: restore-to-first-exec (a new micro-VM started from a stateful snapshot of a
  booted `minimal` micro-VM, then `true` run through its agent) against cold
  boot-to-first-exec of the same micro-VM (1 vCPU, 256 MiB, same daemon, same SDK calls).
  Target: at most 0.2x. Runs are interleaved.
* `vz copy` of a stopped VM whose disk is 2 GiB (the `debian` image): target under 1 s.
  The peer printed beside it is a plain `cp --reflink=auto` of the same disk file, what a
  copy costs without copy-on-write layers. `--skip-copy` leaves it out (it builds the
  Debian image on first use, about a minute).
* Stateful snapshot and restore of a 256 MiB micro-VM: reported (no target).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks._common import median, private_daemon, timed
from vzkit.engines.qemu.disks import QemuState
from vzkit.sdk.client import Client
from vzkit.server.db import Database


def _first_exec(client: Client, body: dict[str, object]) -> float:
    start = time.perf_counter()
    client.create_instance(body)
    res, _, _ = client.exec_capture(str(body["name"]), ["true"])
    elapsed = time.perf_counter() - start
    assert res.exit_code == 0
    client.delete_instance(str(body["name"]), force=True)
    return elapsed


def warm_vs_cold(client: Client, runs: int) -> None:
    client.create_instance({"name": "template"})
    snap = timed(lambda: client.create_snapshot("template", "warm", stateful=True))
    size = client.get_snapshot("template", "warm").size
    restore = [timed(lambda: client.restore_snapshot("template", "warm")) for _ in range(runs)]
    cold, warm = [], []
    for i in range(runs):
        cold.append(_first_exec(client, {"name": f"cold{i}"}))
        warm.append(_first_exec(client, {"name": f"warm{i}", "source": "template/warm"}))
    print(f"cold boot to first exec   median {median(cold):.3f} s  runs {_fmt(cold)}")
    print(f"warm start to first exec  median {median(warm):.3f} s  runs {_fmt(warm)}")
    print(f"ratio warm/cold: {median(warm) / median(cold):.3f} (target <= 0.2)")
    print(
        f"stateful snapshot of a 256 MiB micro-VM: {snap:.3f} s "
        f"({size / 2**20:.0f} MiB of state, free memory zeroed first)"
    )
    print(f"restore of that snapshot in place: median {median(restore):.3f} s")


def copy_time(client: Client, env: dict[str, str], runs: int) -> None:
    client.create_instance({"name": "src", "image": "debian", "type": "vm", "start": False})
    db = Database(Path(env["VZ_STATE_DIR"]) / "vzkit.db")
    try:
        _, uuid, runtime = db.get("src")
    finally:
        db.close()
    disk = (
        Path(env["VZ_STATE_DIR"]) / "instances" / uuid / QemuState.model_validate_json(runtime).disk
    )
    copies = []
    for i in range(runs):
        start = time.perf_counter()
        client.copy_instance("src", f"copy{i}")
        copies.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory(dir=disk.parent.parent) as tmp:
        # The peer: the whole chain flattened into a plain file copy of the 2 GiB disk.
        flat = Path(tmp) / "flat.qcow2"
        peer = timed(
            lambda: subprocess.run(
                ["qemu-img", "convert", "-O", "qcow2", str(disk), str(flat)], check=True
            )
        )
    print(f"vz copy of a VM with a 2 GiB disk: median {median(copies):.3f} s  runs {_fmt(copies)}")
    print(f"  (target < 1 s; a full qemu-img convert of the same disk: {peer:.3f} s)")


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--skip-copy", action="store_true")
    args = parser.parse_args()
    with private_daemon(VZ_CPU_OVERCOMMIT="8") as (env, client):
        warm_vs_cold(client, args.runs)
        if not args.skip_copy:
            copy_time(client, env, args.runs)


if __name__ == "__main__":
    main()
