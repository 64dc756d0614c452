"""A daemon in memory for the unit tier: the real services over a temporary SQLite
database, a :class:`FakeEngine` for every instance type, a network manager that records
instead of touching the host, and an image store with one tiny image."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from vzkit.api.host import HostInfo
from vzkit.api.instances import Accel, InstanceType
from vzkit.api.networks import NetworkConfig
from vzkit.engines.base import Engine
from vzkit.host.kvm import KvmStatus
from vzkit.images.store import BuildResult, ImageStore, Progress
from vzkit.network.manager import NetworkManager
from vzkit.network.nics import NicPlan
from vzkit.server.core import Services, build_services
from vzkit.server.db import Database
from vzkit.settings import Settings

from .fakes import FakeEngine, World

GiB = 1024**3


class _Builder:
    kind = "initramfs"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def inputs(self) -> dict[str, str]:
        return {"version": "1"}

    def build(self, workdir: Path, progress: Progress) -> BuildResult:
        kernel = bytearray(0x300)
        kernel[0x202:0x206] = b"HdrS"
        (workdir / "kernel").write_bytes(bytes(kernel))
        (workdir / "initrd").write_bytes(b"070701")
        return BuildResult(
            files={"kernel": workdir / "kernel", "initrd": workdir / "initrd"},
            kernel_release="6.1.0-fake",
        )


class QuietNetworks(NetworkManager):
    """Records and addresses from the database, as the real one; no bridges, no nft."""

    def __init__(self, settings: Settings, db: Database) -> None:
        super().__init__(settings, db)
        self.synced = 0
        self.released: list[str] = []
        self.unplugged: list[str] = []

    def add(self, name: str, subnet: str = "10.99.0.0/24") -> NetworkConfig:
        net = NetworkConfig(name=name, subnet=IPv4Network(subnet), bridge=f"vzt{name}")
        self.db.insert_network(name, net.model_dump_json())
        return net

    def sync(self) -> None:
        self.synced += 1

    def release(self, name: str) -> None:
        self.released.append(name)

    def unplug(self, nic: NicPlan) -> None:
        self.unplugged.append(nic.host_name)

    def ensure(self, name: str) -> NetworkConfig:
        return self.get(name)

    def reconcile(self) -> None:
        pass

    def supervise(self) -> list[str]:
        return []


def fake_host(cpus: int = 2, memory: int = 24 * GiB) -> HostInfo:
    return HostInfo(
        cpus=cpus,
        cpu_affinity=list(range(cpus)),
        memory_total=memory,
        memory_available=memory,
        qemu_binary="qemu-system-x86_64",
        qemu_version="7.2.0",
        kvm=KvmStatus(usable=False, module=None, reason="no kvm"),
        accel=Accel.TCG,
        accel_reason="no kvm",
        tsc_khz=None,
        tsc_source="none",
        tsc_flags=[],
        cgroup_version=1,
        kernel_release="6.1.0",
        boot_id="b",
        probed_at=datetime.now(UTC),
        probe_ms=1.0,
    )


@dataclass
class Daemon:
    """vzd's services over a fake host; :meth:`restart` is a daemon restart."""

    world: World
    settings: Settings
    db: Database
    engine: FakeEngine
    nets: QuietNetworks
    services: Services

    @classmethod
    def start(cls, world: World, settings: Settings, host: HostInfo | None = None) -> Daemon:
        db = Database(settings.db_path)
        engine = FakeEngine(world)
        nets = QuietNetworks(settings, db)
        images = ImageStore(settings, {"minimal": _Builder})
        engines: dict[InstanceType, Engine] = {t: engine for t in InstanceType}
        services = build_services(settings, db, host or fake_host(), images, engines, networks=nets)
        return cls(world, settings, db, engine, nets, services)

    async def restart(self) -> Daemon:
        """vzd stops (instances keep running) and starts again over the same host."""
        await self.services.close()
        self.db.close()
        again = Daemon.start(self.world, self.settings)
        await again.services.reconcile()
        return again


def unit_settings(root: Path) -> Settings:
    return Settings(
        state_dir=root / "state",
        runtime_dir=root / "run",
        cache_dir=root / "cache",
        default_network="",
        cgroup_parent="vzkit-unit",
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    settings = unit_settings(tmp_path)
    settings.instances_dir.mkdir(parents=True)
    d = Daemon.start(World(settings.instances_dir), settings)
    yield d
    d.db.close()
