"""Usage numbers: per-instance counters and the API's own, as JSON and as Prometheus text.

Per instance: CPU time and memory from its cgroup (QEMU and container inits each have
one), disk bytes from QEMU (``query-blockstats``), network bytes from the host end of its
NICs (a TAP's or veth's transmit is the instance's receive). The API counts requests by
route template and status and keeps a latency histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from vzkit.api.instances import Instance, InstanceStats
from vzkit.host.cgroups import CgroupDriver
from vzkit.network import links
from vzkit.server import lifecycle
from vzkit.server.services.guard import Engines, InstanceGuard
from vzkit.server.services.networks import NetworkService
from vzkit.settings import Settings

__all__ = ["AuditLog", "InstanceStats", "RequestMetrics", "StatsCollector", "render"]

# Seconds: API calls are milliseconds; an instance launch is seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RequestMetrics:
    """Counts and a latency histogram per (method, route template)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = {}
        self.sums: dict[tuple[str, str], float] = defaultdict(float)
        self.started = time.time()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.counts[(method, route, status)] += 1
        key = (method, route)
        counts = self.buckets.setdefault(key, [0] * (len(BUCKETS) + 1))
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[key] += seconds


class AuditLog:
    """Every mutating API call, one JSON line each: when, what, and how it ended.

    Appended with O_APPEND and a single write per line, so lines never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, method: str, path: str, status: int, seconds: float, caller: str) -> None:
        line = json.dumps(
            {
                "time": datetime.now(UTC).isoformat(),
                # unix:uid=N (the local socket), certificate:NAME, token:NAME, anonymous.
                "caller": caller,
                "method": method,
                "path": path,
                "status": status,
                "ms": round(seconds * 1000, 1),
            }
        )
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # the audit log must never fail a request


class StatsCollector:
    """Fresh readings of every instance's counters (those of stopped ones are left empty)."""

    def __init__(
        self,
        settings: Settings,
        guard: InstanceGuard,
        engines: Engines,
        networks: NetworkService,
        cgroups: CgroupDriver | None,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.engines = engines
        self.networks = networks
        self.cgroups = cgroups

    async def collect(self) -> list[InstanceStats]:
        out = []
        for inst in self.guard.instances():
            stats = InstanceStats(name=inst.name, type=inst.type.value, state=inst.state.value)
            if inst.state in lifecycle.ACTIVE:
                await self._read(inst, stats)
            out.append(stats)
        return out

    async def _read(self, inst: Instance, stats: InstanceStats) -> None:
        cg = (
            self.cgroups.open(self.settings.instance_cgroup(inst.name))
            if self.cgroups is not None
            else None
        )
        if cg is not None:
            with contextlib.suppress(Exception):
                usage = cg.stats()
                stats.cpu_seconds = usage.cpu_usage_ns / 1e9
                stats.memory_bytes = usage.memory_current
                stats.pids = usage.pids_current
        if self.engines.supports(inst.type):
            with contextlib.suppress(Exception):
                io = await self.engines.of(inst.type).io_stats(inst.name)
                if io is not None:
                    stats.disk_read_bytes, stats.disk_write_bytes = io
        if inst.nics:
            names = [n.host_name for n in self.networks.plan(inst, self.guard.uuid(inst.name)).nics]
            with contextlib.suppress(Exception):
                # The host end's transmit is what the instance receives.
                # pyroute2 runs an event loop of its own: not on the daemon's.
                host_rx, host_tx = await asyncio.to_thread(links.byte_counters, names)
                stats.net_rx_bytes, stats.net_tx_bytes = host_tx, host_rx


def _labels(**labels: str) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


def render(stats: list[InstanceStats], requests: RequestMetrics, version: str) -> str:
    """The Prometheus text exposition format (0.0.4)."""
    lines: list[str] = []

    def family(name: str, kind: str, help: str) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")

    family("vz_build_info", "gauge", "vzd's version")
    lines.append(f"vz_build_info{_labels(version=version)} 1")
    family("vz_daemon_start_time_seconds", "gauge", "When vzd started (Unix time)")
    lines.append(f"vz_daemon_start_time_seconds {requests.started:.3f}")
    family("vz_instance_state", "gauge", "1 for the instance's current state")
    for s in stats:
        lines.append(f"vz_instance_state{_labels(instance=s.name, type=s.type, state=s.state)} 1")
    counters = (
        ("vz_instance_cpu_seconds_total", "counter", "cpu_seconds", "CPU time used"),
        ("vz_instance_memory_bytes", "gauge", "memory_bytes", "Memory in use"),
        ("vz_instance_pids", "gauge", "pids", "Processes and threads"),
        ("vz_instance_disk_read_bytes_total", "counter", "disk_read_bytes", "Disk bytes read"),
        ("vz_instance_disk_write_bytes_total", "counter", "disk_write_bytes", "Disk bytes written"),
        ("vz_instance_network_receive_bytes_total", "counter", "net_rx_bytes", "Bytes received"),
        ("vz_instance_network_transmit_bytes_total", "counter", "net_tx_bytes", "Bytes sent"),
    )
    for metric, kind, field, help in counters:
        family(metric, kind, help)
        for s in stats:
            value = getattr(s, field)
            if value is not None:
                lines.append(f"{metric}{_labels(instance=s.name)} {value}")
    family("vz_api_requests_total", "counter", "API requests by route and status")
    for (method, route, status), n in sorted(requests.counts.items()):
        labels = _labels(method=method, route=route, status=str(status))
        lines.append(f"vz_api_requests_total{labels} {n}")
    family("vz_api_request_duration_seconds", "histogram", "API request latency")
    for (method, route), counts in sorted(requests.buckets.items()):
        for bound, n in zip((*BUCKETS, "+Inf"), counts, strict=True):
            le = str(bound)
            lines.append(
                "vz_api_request_duration_seconds_bucket"
                f"{_labels(method=method, route=route, le=le)} {n}"
            )
        base = _labels(method=method, route=route)
        lines.append(f"vz_api_request_duration_seconds_sum{base} {requests.sums[(method, route)]}")
        lines.append(f"vz_api_request_duration_seconds_count{base} {counts[-1]}")
    return "\n".join(lines) + "\n"
