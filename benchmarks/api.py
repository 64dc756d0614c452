"""API latency with 200 instances, and launch throughput, through the SDK on the unix socket.

* `GET /1.0/instances` with 200 instances in the database: p50 and p99 over 1000 requests
  (target: p99 under 50 ms). Beside it, `GET /1.0` (no database work) as the floor of one
  HTTP round trip in the same run. Then the same list over the TLS API (bearer token, one
  keep-alive connection) against the unix socket: the ratio of their p50s.
* The same list under concurrent load: 20 clients (one process and one keep-alive
  connection each) listing the 200 instances at once, and 10 clients: p50, p99 and requests
  per second. Through the SDK each client also validates every answer into 200 models
  (about 4 ms of its own CPU, on the same two cores as vzd); the raw rows read the same
  answers over plain HTTP/1.1 keep-alive connections, which is the API's own latency under
  that load (target: p99 under 50 ms at 20 clients).
* The daemon's own CPU time per list request (and per `GET /1.0`), read from
  /proc/PID/stat around the sequential run: unlike the latencies, it does not depend on
  what else the machine is doing.
* 20 containers launched concurrently (20 threads, one client each) against the same 20
  launched one after the other: total times and their ratio.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

# Run as a file (the README's `.venv/bin/python benchmarks/boot.py`), only benchmarks/ is on
# sys.path: the imports below need the repository root there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import private_daemon
from vzkit.sdk.client import Client
from vzkit.sdk.remotes import Remote


def _percentiles(xs: list[float]) -> str:
    qs = statistics.quantiles(xs, n=100)
    return f"p50 {qs[49] * 1000:.2f} ms  p99 {qs[98] * 1000:.2f} ms"


def _timed(call: Callable[[], object], requests: int) -> list[float]:
    out = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def _tls_client(client: Client, state_dir: Path, workdir: Path) -> Client:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    client.set_listen(address)
    token = client.add_trust("bench", "token").token
    shutil.copy(state_dir / "pki" / "ca.crt", workdir / "ca.crt")
    (workdir / "token").write_text(token)
    return Client(remote=Remote("bench", [address], "token", "", workdir))


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("vzd")
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        self.sock = sock


def _raw_lister(socket_path: Path) -> tuple[Callable[[], object], Callable[[], None]]:
    conn = _UnixHTTP(socket_path)

    def get() -> object:
        conn.request("GET", "/1.0/instances")
        answer = conn.getresponse()
        body = answer.read()
        assert answer.status == 200 and body.startswith(b"[")
        return body

    return get, conn.close


def _sdk_lister(socket_path: Path) -> tuple[Callable[[], object], Callable[[], None]]:
    c = Client(socket_path, autostart=False)
    return c.list_instances, c.close


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu(client: Client, call: Callable[[], object], requests: int) -> float:
    """vzd's CPU seconds per ``call`` (user + system, over ``requests`` calls)."""
    pid = client.server_info().pid
    assert pid is not None, "a trusted caller is told vzd's pid"
    before = _cpu_seconds(pid)
    for _ in range(requests):
        call()
    return (_cpu_seconds(pid) - before) / requests


def _client_process(
    socket_path: Path, raw: bool, requests: int, barrier: Barrier, out: Queue[list[float]]
) -> None:
    call, close = (_raw_lister if raw else _sdk_lister)(socket_path)
    try:
        call()  # connect outside the timed part, as a keep-alive client would
        barrier.wait()
        out.put(_timed(call, requests))
    finally:
        close()


def concurrent(socket_path: Path, clients: int, requests: int, *, raw: bool = False) -> float:
    """``clients`` processes list instances at once; prints p50/p99 and throughput, returns
    p99. Processes, not threads: threads of one Python process queue for its GIL, and with
    20 of them that queue, not vzd, made the tail."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    out: Queue[list[float]] = ctx.Queue()
    procs = [
        ctx.Process(target=_client_process, args=(socket_path, raw, requests, barrier, out))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=120)
    start = time.perf_counter()
    samples = [x for _ in procs for x in out.get(timeout=600)]
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join()
    how = "raw HTTP" if raw else "SDK"
    print(
        f"{clients} concurrent clients x {requests} lists ({how}): {_percentiles(samples)}  "
        f"{len(samples) / wall:.0f} requests/s"
    )
    return statistics.quantiles(samples, n=100)[98]


def latency(client: Client, state_dir: Path, count: int, requests: int) -> None:
    for i in range(count):
        client.create_instance({"name": f"i{i:03d}", "type": "container", "start": False})
    assert len(client.list_instances()) == count
    lists = _timed(client.list_instances, requests)
    pings = _timed(client.server_info, requests)
    print(f"GET /1.0/instances ({count} instances), {requests} requests: {_percentiles(lists)}")
    print(f"GET /1.0 (floor), {requests} requests: {_percentiles(pings)}")
    list_cpu = daemon_cpu(client, client.list_instances, requests)
    ping_cpu = daemon_cpu(client, client.server_info, requests)
    print(
        f"vzd CPU per request: list {list_cpu * 1000:.2f} ms, GET /1.0 {ping_cpu * 1000:.2f} ms "
        f"(list/floor {list_cpu / ping_cpu:.2f}x)"
    )
    p99 = statistics.quantiles(lists, n=100)[98]
    print(f"p99 target < 50 ms: {'met' if p99 < 0.05 else 'MISSED'}")
    with tempfile.TemporaryDirectory() as tmp:
        remote = _tls_client(client, state_dir, Path(tmp))
        tls = _timed(remote.list_instances, requests)
        unix = _timed(client.list_instances, requests)  # interleaved in time with the TLS run
        remote.close()
    print(f"over TLS (bearer token, keep-alive): {_percentiles(tls)}")
    ratio = statistics.median(tls) / statistics.median(unix)
    print(f"TLS / unix socket p50: {ratio:.2f}x")
    per_client = max(requests // 20, 10)
    concurrent(client.socket_path, 10, per_client)
    concurrent(client.socket_path, 20, per_client)
    concurrent(client.socket_path, 10, per_client, raw=True)
    p99 = concurrent(client.socket_path, 20, per_client, raw=True)
    print(f"concurrent p99 target < 50 ms at 20 clients: {'met' if p99 < 0.05 else 'MISSED'}")
    client.set_listen(None)
    client.remove_trust("bench")
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
    with private_daemon(VZ_CPU_OVERCOMMIT="32", VZ_MEMORY_OVERCOMMIT="4") as (env, client):
        latency(client, Path(env["VZ_STATE_DIR"]), args.instances, args.requests)
        throughput(client, args.launch)


if __name__ == "__main__":
    main()
