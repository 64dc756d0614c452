"""The daemon's networks: records in the database, made real on the host and kept so.

Creating a network allocates its subnet and bridge name, makes the bridge, starts its
dnsmasq and re-renders vzkit's nft table; each step is undone if a later one fails. On
daemon start every recorded network is ensured again (bridges adopted, a dead dnsmasq
restarted, the nft table re-applied) and bridges vzkit made for networks that no longer
exist are removed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from ipaddress import IPv4Interface

from vzkit.db import Database
from vzkit.errors import Conflict, NotFound
from vzkit.network import ipam, links, nft
from vzkit.network.dnsmasq import Dnsmasq
from vzkit.network.models import NetworkConfig
from vzkit.settings import Settings

log = logging.getLogger(__name__)


class NetworkManager:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def all(self) -> list[NetworkConfig]:
        return [NetworkConfig.model_validate_json(data) for _, data in self.db.network_rows()]

    def get(self, name: str) -> NetworkConfig:
        for net in self.all():
            if net.name == name:
                return net
        raise NotFound(f"network {name!r} not found", hint="list networks: vz network list")

    def create(self, config: NetworkConfig) -> NetworkConfig:
        others = self.all()
        if any(o.name == config.name for o in others):
            raise Conflict(
                f"a network named {config.name!r} already exists",
                hint=f"choose another name, or delete it first: vz network delete {config.name}",
            )
        net = ipam.complete(config, others)
        with contextlib.ExitStack() as undo:
            self._ensure_bridge(net)
            undo.callback(links.delete_link, str(net.bridge))
            dns = Dnsmasq.for_network(self.settings, net)
            dns.write_hosts([])
            dns.start()
            undo.callback(self._remove_dns, net)
            self._apply_nft([*others, net])
            undo.callback(self._apply_nft, others)
            self.db.insert_network(net.name, net.model_dump_json())
            undo.pop_all()
        return net

    def delete(self, name: str) -> None:
        net = self.get(name)
        self.db.delete_network(name)
        self._apply_nft(self.all())
        self._remove_dns(net)
        if net.bridge:
            links.delete_link(net.bridge)

    def reconcile(self) -> None:
        nets = self.all()
        for net in nets:
            try:
                self._ensure_bridge(net)
                Dnsmasq.for_network(self.settings, net).ensure()
            except Exception as exc:
                log.warning("network %s could not be restored: %s", net.name, exc)
        known = {n.name for n in nets}
        for link in links.list_owned():
            if link.network is not None and link.network not in known:
                log.info("removing %s, left by deleted network %s", link.name, link.network)
                links.delete_link(link.name)
        if nets:
            self._apply_nft(nets)

    # -- helpers -------------------------------------------------------------------------

    def _ensure_bridge(self, net: NetworkConfig) -> None:
        assert net.bridge and net.subnet and net.gateway
        links.ensure_bridge(
            net.bridge, IPv4Interface(f"{net.gateway}/{net.subnet.prefixlen}"), net.name
        )

    def _remove_dns(self, net: NetworkConfig) -> None:
        dns = Dnsmasq.for_network(self.settings, net)
        dns.stop()
        shutil.rmtree(dns.state_dir, ignore_errors=True)
        shutil.rmtree(dns.run_dir, ignore_errors=True)

    def _apply_nft(self, nets: list[NetworkConfig]) -> None:
        state = self.settings.state_dir / "nft"
        state.mkdir(parents=True, exist_ok=True)
        if nets:
            nft.apply(nft.Ruleset(networks=nets), state)
        else:
            nft.remove(state)
