"""What each real engine declares it can do per instance type, and that every operation
needing a capability it lacks gets the engine's own words (never a KeyError, a 500)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzkit.api.instances import InstanceType
from vzkit.engines.base import Capabilities
from vzkit.engines.container.engine import ContainerEngine
from vzkit.engines.qemu.engine import QemuEngine
from vzkit.errors import InvalidConfig, StateError
from vzkit.images.store import ImageStore
from vzkit.server import lifecycle

from ..server.conftest import fake_host, unit_settings


def _caps(tmp_path: Path) -> dict[InstanceType, Capabilities]:
    settings = unit_settings(tmp_path)
    images = ImageStore(settings, {})
    qemu = QemuEngine(settings, fake_host(), images, None)
    containers = ContainerEngine(settings, images, None)
    return {
        InstanceType.VM: qemu.capabilities(InstanceType.VM),
        InstanceType.MICROVM: qemu.capabilities(InstanceType.MICROVM),
        InstanceType.CONTAINER: containers.capabilities(InstanceType.CONTAINER),
    }


@pytest.mark.parametrize("kind", list(InstanceType))
def test_every_missing_capability_has_its_refusal(tmp_path: Path, kind: InstanceType) -> None:
    caps = _caps(tmp_path)[kind]
    for op, rule in lifecycle.RULES.items():
        for field in (rule.live, rule.needs):
            if field is not None and getattr(caps, field) is None:
                assert op in caps.refusals, f"{kind.value}: {op} needs {field}, no refusal"


def test_what_each_type_can_do(tmp_path: Path) -> None:
    caps = _caps(tmp_path)
    vm, microvm = caps[InstanceType.VM], caps[InstanceType.MICROVM]
    container = caps[InstanceType.CONTAINER]
    assert vm.live_volumes is not None and microvm.live_volumes is None
    assert vm.memory_snapshots and microvm.memory_snapshots and not container.memory_snapshots
    assert vm.live_export and microvm.live_export and not container.live_export
    assert vm.publish and microvm.publish and not container.publish
    assert container.nic_hotplug is not None and vm.nic_hotplug is None
    assert vm.tap_nics and vm.block_volumes and not (container.tap_nics or container.block_volumes)
    assert container.disk_layers is None and vm.disk_layers is not None
    assert all(c.live_migration is None for c in (vm, microvm, container))


def test_the_refusals_say_what_they_said_before(tmp_path: Path) -> None:
    caps = _caps(tmp_path)
    stateful = caps[InstanceType.CONTAINER].refusals["snapshot-stateful"].error("box")
    assert isinstance(stateful, InvalidConfig)
    assert stateful.message == (
        "containers have no stateful snapshots (their processes are not checkpointed)"
    )
    assert stateful.hint == "take a snapshot without --stateful: it keeps the container's files"
    export = caps[InstanceType.CONTAINER].refusals["export"].error("box")
    assert isinstance(export, StateError)
    assert export.message == (
        "cannot export 'box' while it runs: a container's files change under it"
    )
    assert export.hint == "stop it first: vz stop box"
    attach = caps[InstanceType.MICROVM].refusals["volume-attach"].error("tiny")
    assert attach.message == (
        "cannot attach a volume while micro-VM 'tiny' runs (virtio-mmio has no hot-plug)"
    )
    assert attach.hint == "stop it first (vz stop tiny); the change applies at the next start"
    nic = caps[InstanceType.VM].refusals["nic-detach"].error("web")
    assert nic.message == "cannot remove a network interface from 'web' while it runs"
    assert nic.hint == "stop it first: vz stop web"
