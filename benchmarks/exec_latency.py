"""Exec round trip on a running instance: median of 100 `exec true` through the SDK.

`--type microvm` (default) goes through the guest agent; `--type container` through
`vz-runtime exec`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a file (the README's `.venv/bin/python benchmarks/boot.py`), only benchmarks/ is on
# sys.path: the imports below need the repository root there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, private_daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=100)
    parser.add_argument("--type", default="microvm", choices=["microvm", "vm", "container"])
    args = parser.parse_args()
    with private_daemon() as (_env, client):
        client.create_instance(
            {"name": "bench-exec", "type": args.type, "limits": {"cpus": 1, "memory": "256MiB"}}
        )
        for _ in range(5):
            client.exec_capture("bench-exec", ["true"])
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            res, _, _ = client.exec_capture("bench-exec", ["true"])
            times.append(time.perf_counter() - start)
            assert res.exit_code == 0
        times.sort()
    print(
        f"{args.type}: exec true round trip over {args.runs} runs: "
        f"median {median(times) * 1000:.1f} ms, "
        f"p90 {times[int(len(times) * 0.9)] * 1000:.1f} ms, min {times[0] * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
