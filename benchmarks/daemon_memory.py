"""vzd's resident memory with 0 and with 10 running micro-VMs (target: <= 2 MiB each)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks._common import private_daemon, rss_kib

COUNT = 10


def main() -> None:
    # Ten 1-vCPU guests on a 2-core machine is more than the default overcommit allows.
    with private_daemon(VZ_CPU_OVERCOMMIT="8") as (_env, client):
        pid = int(client.server_info().pid or 0)
        client.build_image("minimal")
        # One exec first so the code paths used per instance are loaded in both readings.
        client.create_instance({"name": "warm", "limits": {"memory": "128MiB"}})
        client.exec_capture("warm", ["true"])
        client.delete_instance("warm", force=True)
        time.sleep(0.5)
        base = rss_kib(pid)
        names = [f"mem{i}" for i in range(COUNT)]

        def launch(name: str) -> None:
            client.create_instance({"name": name, "limits": {"memory": "128MiB"}})
            client.exec_capture(name, ["true"])

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(launch, names))
        time.sleep(0.5)
        loaded = rss_kib(pid)
    per = (loaded - base) / COUNT
    print(f"vzd RSS: {base / 1024:.1f} MiB idle, {loaded / 1024:.1f} MiB with {COUNT} micro-VMs")
    print(f"per instance: {per / 1024:.2f} MiB (target <= 2 MiB)")


if __name__ == "__main__":
    main()
