"""Networks, and each instance's NICs, port forwards and ingress allow-list.

Records and host state are vzkit.network.manager's; this service serialises the changes
(one network lock: dnsmasq files and the nft table are derived from the whole database)
and applies an instance's NIC changes live where its engine can hot-plug.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from vzkit.api.instances import Instance
from vzkit.api.networks import (
    FirewallRule,
    NetworkConfig,
    NetworkUpdate,
    NicConfig,
    PortForward,
    Proto,
)
from vzkit.errors import Conflict, NotFound
from vzkit.network.manager import NetworkManager
from vzkit.network.nics import NetPlan
from vzkit.server import lifecycle
from vzkit.server.events import EventBus
from vzkit.server.services.guard import Engines, InstanceGuard


class NetworkService:
    def __init__(
        self, manager: NetworkManager, guard: InstanceGuard, engines: Engines, events: EventBus
    ) -> None:
        self.manager = manager
        self.guard = guard
        self.engines = engines
        self.events = events
        self._lock = asyncio.Lock()

    # -- networks --------------------------------------------------------------------------

    def all(self) -> list[NetworkConfig]:
        return self.manager.all()

    def get(self, name: str) -> NetworkConfig:
        return self.manager.get(name)

    async def create(self, config: NetworkConfig) -> NetworkConfig:
        async with self._lock:
            net = await asyncio.to_thread(self.manager.create, config)
        self.events.publish("network-created", network=net.name, subnet=str(net.subnet))
        return net

    async def update(self, name: str, change: NetworkUpdate) -> NetworkConfig:
        async with self._lock:
            net = await asyncio.to_thread(self.manager.update, name, change)
        self.events.publish("network-updated", network=name, **change.model_dump(exclude_none=True))
        return net

    async def delete(self, name: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self.manager.delete, name)
        self.events.publish("network-deleted", network=name)

    async def ensure(self, name: str) -> None:
        """Make the network (the default one) on first use."""
        async with self._lock:
            await asyncio.to_thread(self.manager.ensure, name)

    async def supervise(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self.manager.supervise)

    async def reconcile(self) -> None:
        await asyncio.to_thread(self.manager.reconcile)

    # -- what other services need of an instance's networking --------------------------------

    def resolve_nics(
        self,
        name: str,
        uuid: str,
        wanted: list[NicConfig],
        existing: list[NicConfig] | None = None,
    ) -> list[NicConfig]:
        """NICs with addresses and MACs of their own, reserved once the record is saved
        (no await in between: the reservation is atomic on the event loop)."""
        return self.manager.resolve_nics(name, uuid, wanted, existing)

    def check_forward(
        self, inst: Instance, forward: PortForward, pending: list[PortForward] | None = None
    ) -> PortForward:
        return self.manager.check_forward(inst, forward, pending or ())

    def plan(self, inst: Instance, uuid: str) -> NetPlan:
        """What the engine plugs in: TAPs for an engine that takes them, else veths."""
        tap = self.engines.caps(inst.type).tap_nics
        return self.manager.plan(inst, uuid, tap=tap)

    async def sync(self) -> None:
        """dnsmasq's names and reservations and the nft table, from the database."""
        async with self._lock:
            await asyncio.to_thread(self.manager.sync)

    async def release(self, name: str) -> None:
        """Remove a deleted instance's host links."""
        async with self._lock:
            await asyncio.to_thread(self.manager.release, name)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """No network change runs meanwhile (addresses reserved by a new record)."""
        async with self._lock:
            yield

    # -- an instance's NICs ----------------------------------------------------------------

    async def attach_nic(self, name: str, nic: NicConfig) -> Instance:
        """Add a NIC: live where the engine can hot-plug, else at the next start."""
        async with self.guard.hold(name) as rec:
            inst = rec.instance
            new = self.resolve_nics(name, rec.uuid, [nic], inst.nics)
            caps = self.engines.caps(inst.type)
            hotplug = lifecycle.live("nic-attach", name, inst.state, caps, caps.nic_hotplug)
            # Saved before any await: the address is reserved against concurrent requests.
            updated = self.guard.save(inst, nics=[*inst.nics, *new])
            if hotplug is not None:
                try:
                    await hotplug.plug(name, self.plan(updated, rec.uuid).nics[-1])
                except BaseException:
                    self.guard.revert(inst)
                    raise
        await self.sync()
        return updated

    async def detach_nic(self, name: str, network: str) -> Instance:
        """Remove the instance's NICs on ``network`` (and port forwards to them)."""
        async with self.guard.hold(name) as rec:
            inst = rec.instance
            gone = [n for n in inst.nics if n.network == network]
            if not gone:
                raise NotFound(
                    f"instance {name!r} has no interface on network {network!r}",
                    hint=f"see its interfaces: vz info {name}",
                )
            caps = self.engines.caps(inst.type)
            hotplug = lifecycle.live("nic-detach", name, inst.state, caps, caps.nic_hotplug)
            plans = self.plan(inst.model_copy(update={"nics": gone}), rec.uuid).nics
            if hotplug is not None:
                for plan in plans:
                    await hotplug.unplug(name, plan)
            ips = {n.ip for n in gone}
            inst = self.guard.save(
                inst,
                nics=[n for n in inst.nics if n.network != network],
                ports=[p for p in inst.ports if p.ip not in ips],
            )
            if hotplug is None:
                for plan in plans:
                    await asyncio.to_thread(self.manager.unplug, plan)
        await self.sync()
        return inst

    # -- port forwards and the allow-list ------------------------------------------------------

    async def add_port(self, name: str, forward: PortForward) -> Instance:
        async with self.guard.hold(name) as rec:
            lifecycle.check("port", name, rec.instance.state)
            done = self.check_forward(rec.instance, forward)
            inst = self.guard.save(rec.instance, ports=[*rec.instance.ports, done])
        await self.sync()
        return inst

    async def remove_port(self, name: str, host_port: int, proto: Proto) -> Instance:
        async with self.guard.hold(name) as rec:
            lifecycle.check("port", name, rec.instance.state)
            ports = rec.instance.ports
            keep = [p for p in ports if (p.host_port, p.proto) != (host_port, proto)]
            if len(keep) == len(ports):
                raise NotFound(
                    f"instance {name!r} has no forward of host port {host_port}/{proto}",
                    hint=f"list them: vz port list {name}",
                )
            inst = self.guard.save(rec.instance, ports=keep)
        await self.sync()
        return inst

    async def set_firewall(self, name: str, rules: list[FirewallRule] | None) -> Instance:
        """Replace the allow-list (None: let everything in)."""
        async with self.guard.hold(name) as rec:
            lifecycle.check("firewall", name, rec.instance.state)
            inst = self.guard.save(rec.instance, firewall=rules)
        await self.sync()
        return inst

    async def add_firewall_rule(self, name: str, rule: FirewallRule) -> Instance:
        async with self.guard.hold(name) as rec:
            lifecycle.check("firewall", name, rec.instance.state)
            if rule in (rec.instance.firewall or []):
                raise Conflict(f"instance {name!r} already has this rule", hint="vz firewall list")
            inst = self.guard.save(rec.instance, firewall=[*(rec.instance.firewall or []), rule])
        await self.sync()
        return inst

    async def remove_firewall_rule(self, name: str, index: int) -> Instance:
        async with self.guard.hold(name) as rec:
            lifecycle.check("firewall", name, rec.instance.state)
            rules = list(rec.instance.firewall or [])
            if not 0 <= index < len(rules):
                raise NotFound(
                    f"instance {name!r} has no firewall rule {index}",
                    hint=f"rules are numbered from 0: vz firewall list {name}",
                )
            del rules[index]
            inst = self.guard.save(rec.instance, firewall=rules)
        await self.sync()
        return inst
