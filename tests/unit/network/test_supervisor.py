"""The supervisor's decisions, against a fake manager and a fake kernel (no root)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from vzkit.api.instances import Instance, InstanceState, InstanceType, Limits
from vzkit.api.networks import NetworkConfig, NicConfig
from vzkit.errors import Conflict
from vzkit.network import links, nft, nics, supervisor
from vzkit.network.links import LinkInfo
from vzkit.network.supervisor import Supervisor

NET = NetworkConfig.model_validate({"name": "lab", "subnet": "10.80.0.0/24", "bridge": "vzbr0"})
NIC = NicConfig.model_validate(
    {"network": "lab", "ip": "10.80.0.5", "mac": "0a:76:7a:00:00:05", "name": "eth0"}
)
UUID = "11111111-2222-3333-4444-555555555555"
VETH = links.link_name("v", UUID, "eth0")


class FakeDns:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def ensure(self) -> bool:
        return False

    def stop(self) -> None:
        self.log.append("dns stop")

    def start(self) -> None:
        self.log.append("dns start")


class FakeDb:
    def __init__(self, inst: Instance) -> None:
        self.inst = inst

    def uuids(self) -> dict[str, str]:
        return {self.inst.name: UUID}

    def list(self, states: Any = None) -> list[Instance]:
        return [self.inst] if states is None or self.inst.state in states else []


class FakeManager:
    daemon = "0a1b2c3d"
    needs_forwarding = False

    def __init__(self, inst: Instance) -> None:
        self.db = FakeDb(inst)
        self.calls: list[str] = []
        self.listing: str | None = "tables"
        self.generation: int | None = 7

    def all(self) -> list[NetworkConfig]:
        return [NET]

    def ensure_bridge(self, net: NetworkConfig) -> None:
        self.calls.append(f"bridge {net.bridge}")

    def dns(self, net: NetworkConfig) -> FakeDns:
        return FakeDns(self.calls)

    def apply_rules(self, *, force: bool = False) -> None:
        self.calls.append(f"apply force={force}")


def _container(pid: int = 4242) -> Instance:
    return Instance(
        name="web",
        type=InstanceType.CONTAINER,
        image="minimal",
        limits=Limits(),
        state=InstanceState.RUNNING,
        pid=pid,
        created_at=datetime.now(UTC),
        nics=[NIC],
    )


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the fake kernel has: links, the nft generation and listing; and what was done."""
    k: dict[str, Any] = {
        "links": {
            "vzbr0": LinkInfo("vzbr0", 3, None, True),
            VETH: LinkInfo(VETH, 9, 3, True),
        },
        "generation": 7,
        "listing": "tables",
        "plugged": [],
        "attached": [],
    }
    monkeypatch.setattr(links, "list_links", lambda netns=None: dict(k["links"]))
    monkeypatch.setattr(nft, "generation", lambda netns=None: k["generation"])
    monkeypatch.setattr(nft, "listing", lambda daemon, netns=None: k["listing"])
    monkeypatch.setattr(nics, "plug_veth", lambda pid, nic: k["plugged"].append(nic.host_name))
    monkeypatch.setattr(links, "attach", lambda name, **kw: k["attached"].append(name))
    monkeypatch.setattr(supervisor, "alive", lambda pid: True)
    return k


def test_a_healthy_tick_does_nothing(kernel: dict[str, Any]) -> None:
    m = FakeManager(_container())
    assert Supervisor(m).tick() == []  # type: ignore[arg-type]
    assert m.calls == [] and kernel["plugged"] == [] and kernel["attached"] == []


def test_a_vanished_veth_is_replugged_on_the_second_look(kernel: dict[str, Any]) -> None:
    m = FakeManager(_container())
    s = Supervisor(m)  # type: ignore[arg-type]
    del kernel["links"][VETH]
    assert s.tick() == [] and kernel["plugged"] == []
    assert s.tick() == [f"veth {VETH} of web had vanished: made again"]
    assert kernel["plugged"] == [VETH]


def test_a_changed_instance_record_is_not_replugged(kernel: dict[str, Any]) -> None:
    m = FakeManager(_container(pid=1))
    s = Supervisor(m)  # type: ignore[arg-type]
    del kernel["links"][VETH]
    s.tick()
    m.db.inst = _container(pid=2)  # restarted in between: its engine plugs it itself
    s.tick()
    assert kernel["plugged"] == []


def test_a_vanished_bridge_is_made_again_with_its_ports(kernel: dict[str, Any]) -> None:
    m = FakeManager(_container())
    s = Supervisor(m)  # type: ignore[arg-type]
    del kernel["links"]["vzbr0"]
    kernel["links"][VETH] = LinkInfo(VETH, 9, None, False)  # released by the deletion

    def ensure_bridge(net: NetworkConfig) -> None:
        m.calls.append("bridge vzbr0")
        kernel["links"]["vzbr0"] = LinkInfo("vzbr0", 12, None, True)

    m.ensure_bridge = ensure_bridge  # type: ignore[method-assign]
    repairs = s.tick()
    assert repairs[0] == "bridge vzbr0 of network lab had vanished: made again"
    assert kernel["attached"] == [VETH]
    assert m.calls == ["bridge vzbr0", "apply force=True", "dns stop", "dns start"]


def test_changed_tables_are_applied_again(kernel: dict[str, Any]) -> None:
    m = FakeManager(_container())
    s = Supervisor(m)  # type: ignore[arg-type]
    kernel["generation"] = 8  # another daemon's transaction: ours unchanged
    assert s.tick() == [] and m.generation == 8
    kernel["generation"], kernel["listing"] = 9, "flushed"
    assert s.tick() == [
        "the nft tables had been changed from outside: re-applied the nft tables and their sysctls"
    ]
    assert m.calls == ["apply force=True"]


def test_a_bridge_name_another_daemon_took_is_reported_once(
    kernel: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    m = FakeManager(_container())
    s = Supervisor(m)  # type: ignore[arg-type]
    del kernel["links"]["vzbr0"]

    def taken(net: NetworkConfig) -> None:
        raise Conflict("bridge vzbr0 exists and belongs to another vzkit daemon", hint="h")

    m.ensure_bridge = taken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            s.tick()
    assert sum("cannot be made again" in r.message for r in caplog.records) == 1
