"""One dnsmasq per network: DHCP and DNS on the bridge, supervised by the daemon.

dnsmasq daemonizes itself (its parent exits only once the child has bound its sockets, so a
bad config or a busy port is reported by the exit status) and writes a pid file; it is not
the daemon's child, so restarting vzd does not take DHCP and DNS down. A new vzd finds
it again through the pid file (:meth:`Dnsmasq.is_running` checks /proc/PID/cmdline names our
config file, so a recycled pid is not mistaken for it) and :meth:`Dnsmasq.ensure` restarts it
if it died. Leases live in the state directory and survive restarts, so an instance keeps
its address; static addresses and names are in a dhcp-hostsfile and an addn-hosts file,
which SIGHUP (:meth:`Dnsmasq.reload`) re-reads without dropping leases.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Self

from vzkit._proc import alive
from vzkit.api.networks import NetworkConfig
from vzkit.errors import EngineError, InvalidConfig
from vzkit.network import _bin
from vzkit.network._netns import NetnsRef, entered
from vzkit.settings import Settings

__all__ = ["Dnsmasq", "HostEntry", "host_upstreams"]


@dataclass(frozen=True)
class HostEntry:
    """An instance's NIC as DHCP and DNS know it: MAC -> name (and static address)."""

    mac: str
    name: str
    ip: IPv4Address | None = None


def host_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's IPv4 name servers, for dnsmasq to forward non-local names to."""
    servers = []
    try:
        text = resolv_conf.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and ":" not in fields[1]:
            servers.append(fields[1])
    return servers


class Dnsmasq:
    """The dnsmasq of one network. Files: ``state_dir`` (config, leases, hosts), pid in
    ``run_dir``. Usable as a context manager (start ... stop) or driven by the daemon."""

    def __init__(
        self,
        network: NetworkConfig,
        state_dir: Path,
        run_dir: Path,
        *,
        upstreams: Sequence[str] | None = None,
        netns: NetnsRef = None,
        user: str = "root",
    ) -> None:
        if network.subnet is None or network.bridge is None or network.dhcp_range is None:
            raise InvalidConfig(
                f"network {network.name!r} has no subnet or bridge yet",
                hint="pass it through ipam.complete() first",
            )
        self.network = network
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.upstreams = list(host_upstreams() if upstreams is None else upstreams)
        self.netns = netns
        # Root by default: the files sit in vzkit's root-only state dir, and dnsmasq
        # re-reads the hosts files after dropping privileges on SIGHUP.
        self.user = user

    @classmethod
    def for_network(
        cls,
        settings: Settings,
        network: NetworkConfig,
        *,
        upstreams: Sequence[str] | None = None,
        netns: NetnsRef = None,
    ) -> Dnsmasq:
        """The daemon's layout: state_dir/networks/NAME, runtime_dir/networks/NAME."""
        return cls(
            network,
            settings.state_dir / "networks" / network.name,
            settings.runtime_dir / "networks" / network.name,
            upstreams=upstreams,
            netns=netns,
        )

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "dnsmasq.conf"

    @property
    def lease_path(self) -> Path:
        return self.state_dir / "dnsmasq.leases"

    @property
    def dhcp_hosts_path(self) -> Path:
        return self.state_dir / "dhcp-hosts"

    @property
    def hosts_path(self) -> Path:
        return self.state_dir / "hosts"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "dnsmasq.log"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "dnsmasq.pid"

    def render_config(self) -> str:
        net = self.network
        assert net.subnet is not None and net.dhcp_range is not None
        start, end = net.dhcp_range
        lines = [
            f"# written by vzkit for network {net.name}; rewritten on every start",
            f"interface={net.bridge}",
            "bind-interfaces",
            "except-interface=lo",
            f"pid-file={self.pid_path}",
            f"user={self.user}",
            f"log-facility={self.log_path}",
            f"dhcp-range={start},{end},{net.subnet.netmask},1h",
            "dhcp-authoritative",
            f"dhcp-leasefile={self.lease_path}",
            f"dhcp-hostsfile={self.dhcp_hosts_path}",
            f"addn-hosts={self.hosts_path}",
            f"domain={net.dns_domain}",
            f"local=/{net.dns_domain}/",
            "expand-hosts",
            "domain-needed",
            "bogus-priv",
            "no-hosts",
            "no-resolv",
            *(f"server={s}" for s in self.upstreams),
            f"dhcp-option=option:dns-server,{net.gateway}",
        ]
        if net.isolated:
            # An empty router option: instances get no default route off the network.
            lines.append("dhcp-option=option:router")
        else:
            lines.append(f"dhcp-option=option:router,{net.gateway}")
        return "\n".join(lines) + "\n"

    def write_hosts(self, entries: Sequence[HostEntry]) -> bool:
        """Write the MAC -> name/address and name -> address files (call reload() after).

        Returns whether either file changed.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        dhcp = []
        hosts = []
        for e in entries:
            if e.ip is not None:
                dhcp.append(f"{e.mac},{e.ip},{e.name}")
                hosts.append(f"{e.ip} {e.name}.{self.network.dns_domain} {e.name}")
            else:
                dhcp.append(f"{e.mac},{e.name}")
        changed = _atomic_write(self.dhcp_hosts_path, "".join(f"{line}\n" for line in dhcp))
        return _atomic_write(self.hosts_path, "".join(f"{line}\n" for line in hosts)) or changed

    @property
    def pid(self) -> int | None:
        """The running dnsmasq's pid, or None (no pid file, dead, or a recycled pid)."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if f"--conf-file={self.conf_path}".encode() not in cmdline.split(b"\0"):
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start dnsmasq, or adopt the one already running for this network."""
        if self.is_running():
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.dhcp_hosts_path, self.hosts_path):
            if not path.exists():
                path.write_text("")
        _atomic_write(self.conf_path, self.render_config())
        argv = [_bin.find("dnsmasq"), f"--conf-file={self.conf_path}"]
        with entered(self.netns):
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
        if proc.returncode != 0:
            raise EngineError(
                f"dnsmasq for network {self.network.name!r} failed to start: "
                f"{(proc.stderr or proc.stdout).strip()}",
                hint=f"is bridge {self.network.bridge} up with its address? see {self.log_path}",
            )
        # The pid file is written by the daemonized child before the parent exits, but
        # allow a moment for slow file systems.
        deadline = time.monotonic() + 2
        while not self.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.is_running():
            raise EngineError(
                f"dnsmasq for network {self.network.name!r} exited after start",
                hint=f"see {self.log_path}",
            )

    def ensure(self) -> bool:
        """Restart dnsmasq if it died; returns True if it had to be started."""
        if self.is_running():
            return False
        self.start()
        return True

    def reload(self) -> None:
        """Make dnsmasq re-read the hosts files (SIGHUP keeps leases and sockets)."""
        pid = self.pid
        if pid is None:
            raise EngineError(
                f"dnsmasq for network {self.network.name!r} is not running", hint="start it first"
            )
        os.kill(pid, signal.SIGHUP)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop dnsmasq (fine if it is not running) and remove its pid file."""
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _atomic_write(path: Path, text: str) -> bool:
    """Replace ``path`` with ``text`` unless it already holds it; returns whether it did."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    # dnsmasq may re-read on SIGHUP at any moment: it must never see half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True
