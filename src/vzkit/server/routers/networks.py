"""Networks, and an instance's NICs, port forwards and ingress allow-list."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from vzkit.api.instances import Instance
from vzkit.api.networks import (
    FirewallRule,
    FirewallUpdate,
    NetworkConfig,
    NetworkUpdate,
    NicConfig,
    PortForward,
    Proto,
)
from vzkit.server.routers.common import API, ERRORS, Networks

router = APIRouter()
# An instance's NICs, ports and allow-list, registered after the operations' routes.
instance_router = APIRouter()


@router.get(f"{API}/networks", responses=ERRORS)
async def list_networks(networks: Networks) -> list[NetworkConfig]:
    return networks.all()


@router.post(f"{API}/networks", status_code=201, responses=ERRORS)
async def create_network(config: NetworkConfig, networks: Networks) -> NetworkConfig:
    return await networks.create(config)


@router.get(f"{API}/networks/{{name}}", responses=ERRORS)
async def get_network(name: str, networks: Networks) -> NetworkConfig:
    return networks.get(name)


@router.patch(f"{API}/networks/{{name}}", responses=ERRORS)
async def update_network(name: str, change: NetworkUpdate, networks: Networks) -> NetworkConfig:
    return await networks.update(name, change)


@router.delete(f"{API}/networks/{{name}}", status_code=204, responses=ERRORS)
async def delete_network(name: str, networks: Networks) -> Response:
    await networks.delete(name)
    return Response(status_code=204)


@instance_router.post(f"{API}/instances/{{name}}/nics", responses=ERRORS)
async def attach_nic(name: str, nic: NicConfig, networks: Networks) -> Instance:
    return await networks.attach_nic(name, nic)


@instance_router.delete(f"{API}/instances/{{name}}/nics/{{network}}", responses=ERRORS)
async def detach_nic(name: str, network: str, networks: Networks) -> Instance:
    return await networks.detach_nic(name, network)


@instance_router.post(f"{API}/instances/{{name}}/ports", responses=ERRORS)
async def add_port(name: str, forward: PortForward, networks: Networks) -> Instance:
    return await networks.add_port(name, forward)


@instance_router.delete(f"{API}/instances/{{name}}/ports/{{host_port}}", responses=ERRORS)
async def remove_port(
    name: str, host_port: int, networks: Networks, proto: Proto = Proto.TCP
) -> Instance:
    return await networks.remove_port(name, host_port, proto)


@instance_router.put(f"{API}/instances/{{name}}/firewall", responses=ERRORS)
async def set_firewall(name: str, body: FirewallUpdate, networks: Networks) -> Instance:
    return await networks.set_firewall(name, body.rules)


@instance_router.post(f"{API}/instances/{{name}}/firewall/rules", responses=ERRORS)
async def add_firewall_rule(name: str, rule: FirewallRule, networks: Networks) -> Instance:
    return await networks.add_firewall_rule(name, rule)


@instance_router.delete(f"{API}/instances/{{name}}/firewall/rules/{{index}}", responses=ERRORS)
async def remove_firewall_rule(name: str, index: int, networks: Networks) -> Instance:
    return await networks.remove_firewall_rule(name, index)
