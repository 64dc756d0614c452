"""Resolving instances' NICs and the plan engines receive (no kernel involved)."""

from __future__ import annotations

import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Interface

import pytest

from vzkit.api.networks import NetworkConfig, NicConfig
from vzkit.errors import Conflict, InvalidConfig, NotFound, ResourceExhausted
from vzkit.network import ipam, nics

LAB = NetworkConfig.model_validate({"name": "lab", "subnet": "10.90.0.0/24", "bridge": "vzbr1"})
ISO = NetworkConfig.model_validate(
    {"name": "iso", "subnet": "10.91.0.0/29", "bridge": "vzbr2", "isolated": True}
)
NETS = {"lab": LAB, "iso": ISO}


def nic(network: str, **kw: str) -> NicConfig:
    return NicConfig.model_validate({"network": network, **kw})


def test_resolve_fills_in_address_mac_and_name() -> None:
    got = nics.resolve("u1", [nic("lab"), nic("iso"), nic("lab", ip="10.90.0.5")], NETS, [])
    assert [n.name for n in got] == ["eth0", "eth1", "eth2"]
    assert [str(n.ip) for n in got] == ["10.90.0.10", str(ISO.dhcp_range[0]), "10.90.0.5"]  # type: ignore[index]
    assert got[0].mac == ipam.stable_mac("u1", "eth0") and len({n.mac for n in got}) == 3
    # The same request resolves the same way (stable MACs), and skips taken addresses.
    again = nics.resolve("u1", [nic("lab")], NETS, [])
    assert again[0].mac == got[0].mac
    other = nics.resolve("u2", [nic("lab")], NETS, in_use=got)
    assert other[0].ip == IPv4Address("10.90.0.11")
    # Adding to an instance that has NICs: the next free name.
    more = nics.resolve("u1", [nic("iso")], NETS, [], existing=got[:1])
    assert more[0].name == "eth1"


def test_resolve_rejects_clashes() -> None:
    first = nics.resolve("u1", [nic("lab", ip="10.90.0.5")], NETS, [])
    with pytest.raises(Conflict, match="already used"):
        nics.resolve("u2", [nic("lab", ip="10.90.0.5")], NETS, first)
    with pytest.raises(Conflict, match="MAC address"):
        nics.resolve("u2", [nic("lab", mac=str(first[0].mac))], NETS, first)
    with pytest.raises(InvalidConfig, match="outside"):
        nics.resolve("u2", [nic("lab", ip="10.1.0.5")], NETS, [])
    with pytest.raises(NotFound, match="network 'nope'"):
        nics.resolve("u2", [nic("nope")], NETS, [])
    with pytest.raises(Conflict, match="interface named eth0"):
        nics.resolve("u2", [nic("lab", name="eth0")], NETS, [], existing=first)
    # A /29's DHCP range holds few addresses: the next one is refused with a hint.
    taken = nics.resolve("u3", [nic("iso")] * 4, NETS, [])
    with pytest.raises(ResourceExhausted, match="no free address"):
        nics.resolve("u4", [nic("iso")], NETS, taken)


def test_plan_routes_through_the_first_nat_network_only() -> None:
    resolved = nics.resolve("u1", [nic("iso"), nic("lab"), nic("lab")], NETS, [])
    plan = nics.plan("web", "u1", resolved, NETS, tap=True, daemon="0a1b2c3d")
    assert [p.gateway for p in plan.nics] == [None, LAB.gateway, None]
    assert all(p.host_name.startswith("vzt") and len(p.host_name) == 15 for p in plan.nics)
    assert plan.nics[1].address == IPv4Interface(f"{resolved[1].ip}/24")
    assert plan.resolv_conf() == f"nameserver {ISO.gateway}\nsearch vz\n"
    assert nics.plan("web", "u1", [], NETS, tap=False, daemon="0a1b2c3d").nics == ()
    with pytest.raises(InvalidConfig, match="no longer exists"):
        nics.plan("web", "u1", resolved, {"lab": LAB}, tap=False, daemon="0a1b2c3d")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox sh")
def test_guest_script_is_valid_sh() -> None:
    resolved = nics.resolve("u1", [nic("lab"), nic("iso")], NETS, [])
    script = nics.plan("web", "u1", resolved, NETS, tap=True, daemon="0a1b2c3d").guest_script()
    check = subprocess.run(["busybox", "sh", "-n", "-c", script], capture_output=True)
    assert check.returncode == 0, check.stderr
    for n in resolved:
        assert f"byaddr {n.mac}" in script and f"dev {n.name}" in script
    assert f"ip route replace default via {LAB.gateway} dev eth0" in script
