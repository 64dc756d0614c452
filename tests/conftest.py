"""Shared fixtures: a real vzd in temporary directories, torn down with everything it made."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vzkit.host import cgroups
from vzkit.sdk.client import Client
from vzkit.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests need root (cgroups, QEMU, namespaces)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@dataclass
class Daemon:
    """A vzd started for tests, with its own state, runtime and cgroup parent."""

    root: Path
    env: dict[str, str]
    settings: Settings
    proc: subprocess.Popen[bytes] | None = None
    # Run inside this network namespace (networking tests: bridges, nft, dnsmasq stay there).
    netns: str | None = None
    # The networking tests' "outside world" namespace, routed from ``netns``.
    world: str | None = None

    @property
    def socket(self) -> Path:
        return self.settings.socket_path

    def start(self) -> None:
        if self.netns is None and self.env.get("VZ_DEFAULT_NETWORK", "").lower() != "none":
            raise RuntimeError(
                "a test daemon with a default network runs in a network namespace of its own "
                "(netns.py: the netd fixture), never in the host's"
            )
        log = open(self.root / "vzd.log", "ab")  # noqa: SIM115 - the daemon keeps it
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup mounts.
        prefix = ["nsenter", f"--net=/var/run/netns/{self.netns}"] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "vzkit.server.main"],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vzd exited: {self.log_tail()}")
            with contextlib.suppress(Exception):
                Client(self.socket, autostart=False).server_info()
                return
            time.sleep(0.05)
        raise RuntimeError(f"vzd did not come up: {self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def client(self) -> Client:
        return Client(self.socket, autostart=False)

    def vz(
        self, *args: str, input: bytes | None = None, autostart: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the `vz` CLI against this daemon.

        Without ``autostart`` the CLI fails when the daemon is down instead of starting a
        vzd itself: that one would run in the test's own network namespace (the host's),
        not the daemon's, with the test's networks.
        """
        flags = [] if autostart else ["--no-autostart"]
        return subprocess.run(
            [sys.executable, "-m", "vzkit.cli.main", *flags, *args],
            env=self.env,
            input=input,
            capture_output=True,
            timeout=300,
        )

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "vzd.log").read_text()[-3000:]
        return ""

    def qemu_pids(self) -> list[int]:
        """QEMU processes started by this daemon (their -pidfile lies under our root)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                if b"qemu-system" in cmd and str(self.root).encode() in cmd:
                    pids.append(int(proc.name))
        return pids


def _make_daemon(root: Path, cache: Path) -> Daemon:
    # mkdtemp makes 0700 directories: QEMU's unprivileged user must be able to pass.
    root.chmod(0o755)
    env = dict(os.environ)
    env.update(
        VZ_STATE_DIR=str(root / "state"),
        VZ_RUNTIME_DIR=str(root / "run"),
        VZ_CACHE_DIR=str(cache),
        VZ_CGROUP_PARENT=f"vzkit-test-{root.name}",
        VZ_ACCEL=os.environ.get("VZ_ACCEL", ""),
        # No default network on the host: the networking tests run vzd in a namespace of
        # their own and turn it back on there.
        VZ_DEFAULT_NETWORK="none",
    )
    env.pop("VZ_SOCKET", None)
    old = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("VZ_")})
    try:
        settings = Settings()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return Daemon(root=root, env=env, settings=settings)


def _cleanup(d: Daemon, cgroups: bool = True) -> None:
    networks: list[str] = []
    with contextlib.suppress(Exception):
        c = d.client()
        for inst in c.list_instances():
            with contextlib.suppress(Exception):
                c.delete_instance(inst.name, force=True)
        if d.netns is None:
            # Networks belong in a namespace of the test's own: remove any made on the
            # host, then fail the test that made them.
            networks = [n.name for n in c.list_networks()]
            for name in networks:
                with contextlib.suppress(Exception):
                    c.delete_network(name)
    d.stop()
    pids = d.qemu_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    if cgroups:
        remove_cgroups(d.env["VZ_CGROUP_PARENT"])
    assert not networks, f"a test daemon in the host's network namespace made networks {networks}"


def remove_cgroups(parent: str) -> None:
    """Remove a test daemon's cgroup parent (instances' cgroups included) in every hierarchy."""
    cg = cgroups.detect().open(parent)
    if cg is not None:
        cg.destroy(timeout=5.0)


@pytest.fixture(scope="session")
def image_cache() -> Iterator[Path]:
    """The build cache (agent binary, Debian bootstrap tarball) shared by a test session."""
    path = Path(tempfile.mkdtemp(prefix="vzt-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vzd(image_cache: Path) -> Iterator[Daemon]:
    """One daemon for the session: images are built once and shared by the tests."""
    # Short paths: unix socket paths are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="vzt-"))
    d = _make_daemon(root, image_cache)
    d.start()
    try:
        yield d
    finally:
        _cleanup(d)
        assert not d.qemu_pids(), "QEMU processes survived the test session"
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def new_daemon(image_cache: Path, cgroup_parent: str | None = None) -> Iterator[Daemon]:
    """A daemon of the test's own, not started, removed with all it made at the end.

    ``cgroup_parent``: share one (two daemons on one kernel); the caller removes it.
    """
    root = Path(tempfile.mkdtemp(prefix="vzt-"))
    d = _make_daemon(root, image_cache)
    if cgroup_parent is not None:
        d.env["VZ_CGROUP_PARENT"] = cgroup_parent
    try:
        yield d
    finally:
        _cleanup(d, cgroups=cgroup_parent is None)
        # A daemon the CLI started on demand is not d.proc: stop it through the API.
        with contextlib.suppress(Exception):
            Client(d.socket, autostart=False).shutdown_daemon()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def private_daemon(image_cache: Path) -> Iterator[Daemon]:
    """A daemon of the test's own, not started: the test may change its env first."""
    with new_daemon(image_cache) as d:
        yield d


@pytest.fixture
def client(vzd: Daemon) -> Iterator[Client]:
    """A client whose instances are all deleted when the test ends."""
    c = vzd.client()
    before = {i.name for i in c.list_instances()}
    yield c
    for inst in c.list_instances():
        if inst.name not in before:
            with contextlib.suppress(Exception):
                c.delete_instance(inst.name, force=True)
