"""Starting a container through vzd: user-namespaced (the default) against privileged.

What a user namespace adds on the engine path (an idmapped lower layer, the maps, the
runtime's middle process) measured against its peer in the same run, a privileged
container of the same image: median of N ``start`` calls (from stopped to the init
running, NICs none), and of N create+start+delete cycles, through the SDK.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a file, only benchmarks/ is on sys.path: the imports below need the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, private_daemon
from vzkit.sdk.client import Client


def _starts(client: Client, name: str, privileged: bool, runs: int) -> float:
    client.create_instance(
        {"name": name, "type": "container", "start": False, "nics": [],
         "security": {"privileged": privileged}}
    )  # fmt: skip
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        client.start(name)
        times.append(time.perf_counter() - start)
        client.stop(name, force=True)
    client.delete_instance(name, force=True)
    return median(times)


def _cycles(client: Client, privileged: bool, runs: int) -> float:
    times = []
    for i in range(runs):
        name = f"cyc-{int(privileged)}-{i}"
        start = time.perf_counter()
        client.create_instance(
            {"name": name, "type": "container", "nics": [],
             "security": {"privileged": privileged}}
        )  # fmt: skip
        client.delete_instance(name, force=True)
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=10)
    args = parser.parse_args()
    with private_daemon() as (_env, client):
        # Warm-up: the image, its unpacked tree, the runtime's caches, the user namespace.
        for privileged in (True, False):
            _cycles(client, privileged, 2)
        rows = {
            "start, privileged": _starts(client, "bench-priv", True, args.runs),
            "start, user namespace": _starts(client, "bench-uns", False, args.runs),
            "create+start+delete, privileged": _cycles(client, True, args.runs),
            "create+start+delete, user namespace": _cycles(client, False, args.runs),
        }
    print(f"container through vzd, median of {args.runs}")
    for key, t in rows.items():
        peer = rows[f"{key.partition(', ')[0]}, privileged"]
        print(f"  {key:<38} {t * 1000:7.1f} ms   {t / peer:.2f}x privileged")


if __name__ == "__main__":
    main()
