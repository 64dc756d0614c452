"""The daemon's services wired together: what ``main`` serves and what the unit tests drive.

Every service gets what it needs from the others as public typed methods; the order below
is the order of their dependencies (nothing depends on a service built after it).
"""

from __future__ import annotations

from dataclasses import dataclass

from vzkit.api.host import HostInfo
from vzkit.api.instances import InstanceType
from vzkit.engines.base import Engine
from vzkit.host.cgroups import CgroupDriver
from vzkit.host.resources import OvercommitPolicy
from vzkit.images.store import ImageStore
from vzkit.network.manager import NetworkManager
from vzkit.server.db import Database
from vzkit.server.events import EventBus
from vzkit.server.metrics import StatsCollector
from vzkit.server.operations import Operations
from vzkit.server.services.guard import Engines, InstanceGuard
from vzkit.server.services.images import ImageService
from vzkit.server.services.instances import InstanceService
from vzkit.server.services.networks import NetworkService
from vzkit.server.services.power import Power
from vzkit.server.services.snapshots import SnapshotService
from vzkit.server.services.transfers import TransferService
from vzkit.server.services.volumes import VolumeService
from vzkit.settings import Settings
from vzkit.storage.manager import StorageManager


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    events: EventBus
    operations: Operations
    guard: InstanceGuard
    instances: InstanceService
    snapshots: SnapshotService
    transfers: TransferService
    volumes: VolumeService
    networks: NetworkService
    images: ImageService
    stats: StatsCollector

    async def reconcile(self) -> None:
        """After a daemon start: records matched with what is alive, half-made snapshots
        removed, the host's networks made to match."""
        self.transfers.remove_staging()
        await self.instances.reconcile()
        await self.snapshots.reconcile()
        await self.networks.reconcile()

    async def close(self) -> None:
        """Drop connections to running instances; they keep running."""
        await self.instances.close()


def build_services(
    settings: Settings,
    db: Database,
    host: HostInfo,
    images: ImageStore,
    engines: dict[InstanceType, Engine],
    *,
    cgroups: CgroupDriver | None = None,
    networks: NetworkManager | None = None,
    policy: OvercommitPolicy | None = None,
) -> Services:
    events = EventBus()
    registry = Engines(engines)
    guard = InstanceGuard(db, registry, events)
    policy = policy or OvercommitPolicy(
        cpu_overcommit=settings.cpu_overcommit, memory_overcommit=settings.memory_overcommit
    )
    nets = NetworkService(networks or NetworkManager(settings, db), guard, registry, events)
    volumes = VolumeService(StorageManager(settings, db), guard, registry, events)
    image_service = ImageService(settings, images, guard)
    power = Power(guard, registry, nets, volumes, host, policy)
    snapshots = SnapshotService(guard, registry, power, nets, events)
    instances = InstanceService(
        settings, guard, registry, power, image_service, nets, volumes, snapshots, events
    )
    transfers = TransferService(settings, guard, registry, snapshots, image_service, nets, events)
    return Services(
        settings=settings,
        db=db,
        events=events,
        operations=Operations(events),
        guard=guard,
        instances=instances,
        snapshots=snapshots,
        transfers=transfers,
        volumes=volumes,
        networks=nets,
        images=image_service,
        stats=StatsCollector(settings, guard, registry, nets, cgroups),
    )
