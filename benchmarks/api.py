"""API latency with 200 instances, and launch throughput, through the SDK on the unix socket.

* `GET /1.0/instances` with 200 instances in the database: p50 and p99 over 1000 requests
  (target: p99 under 50 ms). Beside it, `GET /1.0` (no database work) as the floor of one
  HTTP round trip in the same run.
* 20 containers launched concurrently (20 threads, one client each) against the same 20
  launched one after the other: total times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks._common import private_daemon
from vzkit.client import Client


def _percentiles(xs: list[float]) -> str:
    qs = statistics.quantiles(xs, n=100)
    return f"p50 {qs[49] * 1000:.2f} ms  p99 {qs[98] * 1000:.2f} ms"


def latency(client: Client, count: int, requests: int) -> None:
    for i in range(count):
        client.create_instance({"name": f"i{i:03d}", "type": "container", "start": False})
    assert len(client.list_instances()) == count
    lists, pings = [], []
    for _ in range(requests):
        start = time.perf_counter()
        client.list_instances()
        lists.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.server_info()
        pings.append(time.perf_counter() - start)
    print(f"GET /1.0/instances ({count} instances), {requests} requests: {_percentiles(lists)}")
    print(f"GET /1.0 (floor), {requests} requests: {_percentiles(pings)}")
    p99 = statistics.quantiles(lists, n=100)[98]
    print(f"p99 target < 50 ms: {'met' if p99 < 0.05 else 'MISSED'}")
    for i in range(count):
        client.delete_instance(f"i{i:03d}")


def throughput(socket_client: Client, n: int) -> None:
    def launch(name: str) -> None:
        c = Client(socket_client.socket_path, autostart=False)
        c.create_instance({"name": name, "type": "container"})
        c.close()

    start = time.perf_counter()
    for i in range(n):
        launch(f"seq{i}")
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(launch, [f"par{i}" for i in range(n)]))
    concurrent = time.perf_counter() - start
    print(f"{n} containers one by one: {sequential:.2f} s; concurrently: {concurrent:.2f} s")
    print(f"ratio concurrent/sequential: {concurrent / sequential:.2f}")
    for inst in socket_client.list_instances():
        socket_client.delete_instance(inst.name, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--launch", type=int, default=20)
    args = parser.parse_args()
    with private_daemon(VZ_CPU_OVERCOMMIT="32", VZ_MEMORY_OVERCOMMIT="4") as (_env, client):
        latency(client, args.instances, args.requests)
        throughput(client, args.launch)


if __name__ == "__main__":
    main()
