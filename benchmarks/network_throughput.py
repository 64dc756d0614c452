"""TCP throughput between two containers on one vzkit network against a bare veth pair.

vz side: a private vzd runs inside a network namespace of its own with the default network
vzbr0, so two `minimal` containers each get a NIC on that bridge. The host's iperf3 runs
inside each container's network namespace (nsenter --net=/proc/PID/ns/net), which measures
exactly the container data path: veth -> bridge -> veth, with vzkit's nft table and
br_netfilter in the way.

Peer: two bare network namespaces joined by a plain veth pair (10.99.0.1/24, 10.99.0.2/24)
and nothing else, the same iperf3 invocation and duration. Runs are interleaved (peer, vz,
peer, vz, ...) so drift in machine load hits both alike. The ratio is vz's median Gbit/s
over the peer's; the target is >= 0.8.

VM to VM: two microVMs (TCG here) on the same network; the guests have only busybox, so one
listens with `nc -l` and counts the bytes, and the other times `dd if=/dev/zero | nc` on its
own clock. Report only, no target (`--skip-vm` leaves it out).

No traffic leaves loopback or the benchmark's own namespaces, all of which are deleted at
the end (with any process still in them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# Run as a file (the README's `.venv/bin/python benchmarks/boot.py`), only benchmarks/ is on
# sys.path: the imports below need the repository root there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, private_daemon
from vzkit.sdk.client import Client

PORT = 5201
VM_PORT = 5001
PEER_IPS = ("10.99.0.1", "10.99.0.2")


def _run(argv: Sequence[str], timeout: float = 60) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _netns_add(name: str) -> None:
    _run(["ip", "netns", "add", name])
    _run(["ip", "-n", name, "link", "set", "lo", "up"])


def _netns_delete(name: str) -> None:
    """Kill whatever still runs in the namespace (dnsmasq outlives vzd), then delete it."""
    with contextlib.suppress(Exception):
        for _ in range(50):
            pids = [int(p) for p in _run(["ip", "netns", "pids", name]).split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(Exception):
                    _run(["kill", "-9", str(pid)])
            time.sleep(0.1)
    with contextlib.suppress(Exception):
        _run(["ip", "netns", "delete", name])


@contextlib.contextmanager
def _namespaces(*names: str) -> Iterator[None]:
    made: list[str] = []
    try:
        for name in names:
            _netns_add(name)
            made.append(name)
        yield
    finally:
        for name in reversed(made):
            _netns_delete(name)


def _setup_peer(ns1: str, ns2: str) -> None:
    _run(["ip", "-n", ns1, "link", "add", "veth0", "type", "veth", "peer", "veth0", "netns", ns2])
    for ns, ip in zip((ns1, ns2), PEER_IPS, strict=True):
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "veth0"])
        _run(["ip", "-n", ns, "link", "set", "veth0", "up"])


def _wait_listening(nsenter: list[str], port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"iperf3 server exited early ({server.returncode})")
        out = _run([*nsenter, "ss", "-Hltn", f"sport = :{port}"])
        if out.strip():
            return
        time.sleep(0.02)
    raise RuntimeError(f"iperf3 server not listening on port {port}")


def iperf(server_net: str, client_net: str, server_ip: str, seconds: int) -> float:
    """One iperf3 TCP test between two network namespaces (nsfs paths); Gbit/s received."""
    srv_enter = ["nsenter", f"--net={server_net}"]
    cli_enter = ["nsenter", f"--net={client_net}"]
    server = subprocess.Popen(
        [*srv_enter, "iperf3", "-s", "-1", "-p", str(PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(srv_enter, PORT, server)
        out = _run(
            [*cli_enter, "iperf3", "-c", server_ip, "-p", str(PORT), "-t", str(seconds), "-J"],
            timeout=seconds + 30,
        )
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    result = json.loads(out)
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def _guest_sh(client: Client, name: str, script: str, timeout: float = 120) -> bytes:
    res, out, err = client.exec_capture(name, ["sh", "-c", script], timeout=timeout)
    if res.exit_code != 0:
        raise RuntimeError(f"{script!r} failed in {name}: {err.decode(errors='replace')}")
    return out


def vm_throughput(client: Client, server: str, sender: str, ip: str, count: int) -> float:
    """MB/s of one `dd | nc` transfer of ``count`` 64 KiB blocks from ``sender`` to ``ip``.

    The listener's stdin is a FIFO opened read-write, which never reaches EOF: busybox nc
    half-closes the connection when its stdin ends, and the sender's nc quits on that FIN,
    so a listener reading /dev/null would cut the transfer short. The listener counts the
    bytes it got; the time is the sender's pipeline, on the guest's own clock (10 ms).
    """
    _guest_sh(
        client,
        server,
        "rm -f /tmp/got; mkfifo /tmp/in 2>/dev/null; "
        f"nc -l -p {VM_PORT} <>/tmp/in 2>/dev/null | wc -c > /tmp/got.part 2>/dev/null && "
        "mv /tmp/got.part /tmp/got &",
    )
    deadline = time.monotonic() + 10
    while f":{VM_PORT} ".encode() not in _guest_sh(client, server, "netstat -ltn"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nc -l in {server} is not listening")
        time.sleep(0.05)
    out = _guest_sh(
        client,
        sender,
        "a=$(cut -d' ' -f1 /proc/uptime); "
        f"dd if=/dev/zero bs=64k count={count} 2>/dev/null | nc -w 2 {ip} {VM_PORT}; "
        "b=$(cut -d' ' -f1 /proc/uptime); echo $a $b",
        timeout=600,
    )
    start, end = (float(x) for x in out.split())
    deadline = time.monotonic() + 10
    while not (got := _guest_sh(client, server, "cat /tmp/got 2>/dev/null || true").strip()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the listener in {server} did not finish")
        time.sleep(0.05)
    if int(got) != count * 65536:
        raise RuntimeError(f"{server} received {int(got)} bytes of {count * 65536}")
    return int(got) / max(end - start, 0.01) / 1e6


def _fmt(xs: list[float]) -> str:
    return str([round(x, 2) for x in xs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("-t", "--time", type=int, default=5, help="seconds per iperf3 run")
    parser.add_argument("--vm-mib", type=int, default=20, help="MiB per VM to VM transfer")
    parser.add_argument("--skip-vm", action="store_true", help="leave out VM to VM")
    args = parser.parse_args()

    tag = f"vzb-{secrets.token_hex(3)}"
    vz_ns, p1, p2 = tag, f"{tag}-p1", f"{tag}-p2"
    peer_t: list[float] = []
    vz_t: list[float] = []
    vm_t: list[float] = []
    accel = None
    with (
        _namespaces(vz_ns, p1, p2),
        private_daemon(netns=vz_ns, VZ_DEFAULT_NETWORK="vzbr0") as (_env, client),
    ):
        _setup_peer(p1, p2)
        peer = (f"/var/run/netns/{p1}", f"/var/run/netns/{p2}", PEER_IPS[0])
        a = client.create_instance({"name": "a", "type": "container", "image": "minimal"})
        b = client.create_instance({"name": "b", "type": "container", "image": "minimal"})
        if a.pid is None or b.pid is None or not a.nics or not b.nics or a.nics[0].ip is None:
            raise RuntimeError(f"containers have no pid or address: {a!r} {b!r}")
        vz = (f"/proc/{a.pid}/ns/net", f"/proc/{b.pid}/ns/net", str(a.nics[0].ip))
        # Warm both paths once (ARP, page cache, conntrack) before measuring.
        iperf(*peer, 1)
        iperf(*vz, 1)
        for _ in range(args.runs):
            peer_t.append(iperf(*peer, args.time))
            vz_t.append(iperf(*vz, args.time))
        client.delete_instance("a", force=True)
        client.delete_instance("b", force=True)

        if not args.skip_vm:
            v1 = client.create_instance({"name": "v1", "image": "minimal"})
            client.create_instance({"name": "v2", "image": "minimal"})
            if not v1.nics or v1.nics[0].ip is None:
                raise RuntimeError(f"v1 has no address: {v1!r}")
            accel = v1.accel
            count = args.vm_mib * 16  # 64 KiB blocks
            vm_throughput(client, "v1", "v2", str(v1.nics[0].ip), 16)  # warm-up
            for _ in range(args.runs):
                vm_t.append(vm_throughput(client, "v1", "v2", str(v1.nics[0].ip), count))

    p, v = median(peer_t), median(vz_t)
    print(f"iperf3 TCP, {args.time}s per run, {args.runs} runs each, interleaved")
    print(f"bare veth pair (netns <-> netns)     median {p:.2f} Gbit/s  runs {_fmt(peer_t)}")
    print(f"vz container <-> container (vzbr0)   median {v:.2f} Gbit/s  runs {_fmt(vz_t)}")
    print(f"ratio vz/veth: {v / p:.3f} (target >= 0.8)")
    if vm_t:
        print(
            f"vz microVM -> microVM ({accel}, dd|nc {args.vm_mib} MiB)  "
            f"median {median(vm_t):.1f} MB/s  runs {_fmt(vm_t)} (report only)"
        )


if __name__ == "__main__":
    main()
