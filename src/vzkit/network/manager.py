"""The daemon's networks: records in the database, made real on the host and kept so.

Creating a network allocates its subnet and bridge name, makes the bridge, starts its
dnsmasq and re-renders the daemon's nft tables; each step is undone if a later one fails.
On daemon start every recorded network is ensured again (bridges adopted, a dead dnsmasq
restarted, the nft tables re-applied) and links this daemon made for networks or
instances that no longer exist are removed. Every link, table and cgroup carries the
daemon's identity (``Settings.daemon_id``) and nothing of another daemon's is adopted or
removed, so several daemons (state dirs) can share a host or a network namespace.

The nft tables and dnsmasq's host files are always derived from the whole database
(networks, and every instance's NICs, port forwards and allow-list), never patched, so
whatever changed, one :meth:`NetworkManager.sync` makes the host match; and
:meth:`NetworkManager.supervise` (every second) puts back what vanished from outside.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Sequence
from ipaddress import IPv4Interface
from pathlib import Path

from vzkit.api.instances import Instance, InstanceType
from vzkit.api.networks import NetworkConfig, NetworkUpdate, NicConfig, PortForward
from vzkit.errors import Conflict, InvalidConfig, NotFound
from vzkit.network import ipam, links, nft, nics
from vzkit.network.dnsmasq import Dnsmasq, HostEntry
from vzkit.network.supervisor import Supervisor
from vzkit.server.db import Database
from vzkit.settings import Settings

log = logging.getLogger(__name__)


class NetworkManager:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.daemon = settings.daemon_id
        # The ruleset last applied ("" for no tables): most instance changes (an ephemeral
        # sandbox coming and going) do not change it, and an `nft` run costs milliseconds.
        self._applied: str | None = None
        # The kernel's listing of our tables right after that apply, and the ruleset
        # generation it was taken at: supervision compares (network/supervisor.py).
        self.listing: str | None = None
        self.generation: int | None = None
        self.needs_forwarding = False
        # Set by the migration of a pre-identity state dir: drop `inet vzkit` at next apply.
        self._drop_legacy = False
        self.supervisor = Supervisor(self)

    # -- networks ------------------------------------------------------------------------

    def all(self) -> list[NetworkConfig]:
        return [NetworkConfig.model_validate_json(data) for _, data in self.db.network_rows()]

    def by_name(self) -> dict[str, NetworkConfig]:
        return {n.name: n for n in self.all()}

    def get(self, name: str) -> NetworkConfig:
        net = self.by_name().get(name)
        if net is None:
            raise NotFound(f"network {name!r} not found", hint="list networks: vz network list")
        return net

    def users(self, name: str) -> list[str]:
        return [i.name for i in self.db.list() if any(n.network == name for n in i.nics)]

    def create(self, config: NetworkConfig) -> NetworkConfig:
        others = self.all()
        if any(o.name == config.name for o in others):
            raise Conflict(
                f"a network named {config.name!r} already exists",
                hint=f"choose another name, or delete it first: vz network delete {config.name}",
            )
        net = ipam.complete(config, others, links=links.list_links())
        with contextlib.ExitStack() as undo:
            self.ensure_bridge(net)
            undo.callback(links.delete_link, str(net.bridge), daemon=self.daemon)
            dns = self.dns(net)
            dns.write_hosts([])
            dns.start()
            undo.callback(self._remove_dns, net)
            self.db.insert_network(net.name, net.model_dump_json())
            undo.callback(self.db.delete_network, net.name)
            self.apply_rules()
            undo.pop_all()
        return net

    def ensure(self, name: str) -> NetworkConfig:
        """The network ``name``, created with defaults if it does not exist (vzbr0)."""
        with contextlib.suppress(NotFound):
            return self.get(name)
        log.info("creating the default network %s", name)
        return self.create(NetworkConfig(name=name))

    def update(self, name: str, change: NetworkUpdate) -> NetworkConfig:
        net = self.get(name)
        new = NetworkConfig.model_validate(net.model_dump() | change.model_dump(exclude_none=True))
        if new == net:
            return net
        self.db.update_network(name, new.model_dump_json())
        try:
            self.apply_rules()
            dns = self.dns(new)
            # dnsmasq reads its options only at start; leases and reservations stay on disk.
            dns.stop()
            dns.start()
        except BaseException:
            self.db.update_network(name, net.model_dump_json())
            self.apply_rules()
            self.dns(net).ensure()
            raise
        return new

    def delete(self, name: str) -> None:
        net = self.get(name)
        users = self.users(name)
        if users:
            raise Conflict(
                f"network {name!r} is in use by {', '.join(users)}",
                hint=f"detach or delete them first: vz network detach {users[0]} {name}",
            )
        self.db.delete_network(name)
        self.apply_rules()
        self._remove_dns(net)
        if net.bridge:
            links.delete_link(net.bridge, daemon=self.daemon)

    def reconcile(self) -> None:
        """After a daemon start: make the host match the database, remove what it lacks
        (of this daemon's links only)."""
        nets = self.all()
        if self.settings.predates_identity:
            self._claim_legacy(nets)
        for net in nets:
            try:
                self.ensure_bridge(net)
                self.dns(net).ensure()
            except Exception as exc:
                log.warning("network %s could not be restored: %s", net.name, exc)
        known = {n.name for n in nets}
        bridges = {n.bridge for n in nets}
        instances = {i.name for i in self.db.list()}
        for link in links.list_owned(self.daemon):
            gone_net = link.network is not None and link.network not in known
            gone_inst = link.instance is not None and link.instance not in instances
            half_made = link.network is None and link.name not in bridges
            if gone_net or gone_inst or half_made:
                log.info("removing %s, left by a deleted network or instance", link.name)
                links.delete_link(link.name, daemon=self.daemon)
        self.sync()

    def supervise(self) -> list[str]:
        """Put back what vanished from outside (bridges, instances' links, the nft tables,
        dnsmasq); returns what was repaired, also logged."""
        return self.supervisor.tick()

    # -- instances -----------------------------------------------------------------------

    def resolve_nics(
        self,
        name: str,
        uuid: str,
        requested: list[NicConfig],
        existing: list[NicConfig] | None = None,
    ) -> list[NicConfig]:
        in_use = [nic for i in self.db.list() if i.name != name for nic in i.nics]
        return nics.resolve(uuid, requested, self.by_name(), in_use, existing or [])

    def plan(self, inst: Instance, uuid: str, *, tap: bool) -> nics.NetPlan:
        return nics.plan(inst.name, uuid, inst.nics, self.by_name(), tap=tap, daemon=self.daemon)

    def release(self, name: str) -> None:
        """Remove an instance's host links (the instance is already out of the database)."""
        for link in links.list_owned(self.daemon):
            if link.instance == name:
                links.delete_link(link.name, daemon=self.daemon)
        self.sync()

    def unplug(self, nic: nics.NicPlan) -> None:
        """Remove a stopped instance's host link (a VM's TAP outlives its QEMU)."""
        links.delete_link(nic.host_name, daemon=self.daemon)

    def check_forward(
        self, inst: Instance, forward: PortForward, pending: Sequence[PortForward] = ()
    ) -> PortForward:
        """The forward with the instance's address filled in; Conflict if the port is taken.

        ``pending``: forwards of the same request, not in the database yet.
        """
        nets = self.by_name()
        targets = [n for n in inst.nics if n.network in nets and not nets[n.network].isolated]
        if not targets:
            raise InvalidConfig(
                f"instance {inst.name!r} has no interface on a non-isolated network",
                hint=f"attach it to one first: vz network attach {inst.name} vzbr0",
            )
        taken = [(o.name, pf) for o in self.db.list() for pf in o.ports]
        for owner, pf in [*taken, *((inst.name, pf) for pf in pending)]:
            if (pf.host_port, pf.proto) == (forward.host_port, forward.proto):
                raise Conflict(
                    f"host port {forward.host_port}/{forward.proto} is already forwarded "
                    f"to {owner!r}",
                    hint=f"pick another host port, or remove it: vz port remove {owner} "
                    f"{forward.host_port}/{forward.proto}",
                )
        if _listening(forward.host_port, forward.proto.value):
            raise Conflict(
                f"host port {forward.host_port}/{forward.proto} is in use by a program on the host",
                hint="pick another host port",
            )
        if (forward.proto.value, forward.host_port) in nft.forwarded_elsewhere(self.daemon):
            raise Conflict(
                f"host port {forward.host_port}/{forward.proto} is forwarded by another vzkit "
                "daemon on this host",
                hint="pick another host port",
            )
        return forward.model_copy(update={"ip": targets[0].ip})

    def sync(self) -> None:
        """Make dnsmasq's host files and the nft tables match the database."""
        instances = self.db.list()
        for net in self.all():
            entries = [
                HostEntry(mac=str(nic.mac), name=inst.name, ip=nic.ip)
                for inst in instances
                for nic in inst.nics
                if nic.network == net.name
            ]
            dns = self.dns(net)
            if dns.write_hosts(entries) and dns.is_running():
                dns.reload()
        self.apply_rules()

    def apply_rules(self, *, force: bool = False) -> None:
        """Apply the ruleset the database implies, unless it is the one applied last
        (``force``: also then, after a change from outside)."""
        nets = self.all()
        state = self.settings.state_dir / "nft"
        state.mkdir(parents=True, exist_ok=True)
        if not nets:
            if force or self._applied != "" or (state / "ip_forward.orig").exists():
                nft.remove(self.daemon, state, drop_legacy=self._drop_legacy)
                self._legacy_done()
            self._applied = self.listing = ""
            self.needs_forwarding = False
            return
        rules = self._ruleset(nets)
        text = nft.render(rules)
        if text == self._applied and not force:
            return
        self._applied = None  # unknown if apply fails half-way
        nft.apply(rules, state, drop_legacy=self._drop_legacy)
        self._legacy_done()
        self._applied = text
        self.note_listing()
        self.needs_forwarding = rules.needs_forwarding

    def note_listing(self) -> None:
        """Remember our tables as the kernel has them now (the generation first: a change
        after it shows as a new generation on the next check)."""
        self.generation = nft.generation()
        self.listing = nft.listing(self.daemon)

    def _ruleset(self, nets: list[NetworkConfig]) -> nft.Ruleset:
        instances = self.db.list()
        uuids = self.db.uuids()
        firewalls = [
            nft.InstanceFirewall(ip=nic.ip, rules=inst.firewall)
            for inst in instances
            if inst.firewall is not None
            for nic in inst.nics
            if nic.ip is not None
        ]
        ports = [
            nft.PortGuard(port=name, mac=str(nic.mac), ip=nic.ip)
            for inst in instances
            if inst.name in uuids
            for nic in inst.nics
            if nic.ip is not None and nic.mac is not None
            for name in [self.port_name(inst, uuids[inst.name], nic)]
        ]
        return nft.Ruleset(
            daemon=self.daemon,
            networks=nets,
            forwards=[pf for inst in instances for pf in inst.ports],
            firewalls=firewalls,
            ports=ports,
            state_dir=str(self.settings.state_dir),
        )

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def port_name(inst: Instance, uuid: str, nic: NicConfig) -> str:
        """The host-side link of an instance's NIC: a veth end for containers, else a TAP."""
        kind = "v" if inst.type is InstanceType.CONTAINER else "t"
        return links.link_name(kind, uuid, str(nic.name))

    def dns(self, net: NetworkConfig) -> Dnsmasq:
        return Dnsmasq.for_network(self.settings, net)

    def ensure_bridge(self, net: NetworkConfig) -> None:
        assert net.bridge and net.subnet and net.gateway
        links.ensure_bridge(
            net.bridge,
            IPv4Interface(f"{net.gateway}/{net.subnet.prefixlen}"),
            net.name,
            daemon=self.daemon,
            mac=ipam.stable_mac(f"network/{net.name}", "bridge"),
        )

    def _remove_dns(self, net: NetworkConfig) -> None:
        dns = self.dns(net)
        dns.stop()
        shutil.rmtree(dns.state_dir, ignore_errors=True)
        shutil.rmtree(dns.run_dir, ignore_errors=True)

    # -- state dirs from before daemon identities -------------------------------------------

    @property
    def _legacy_mark(self) -> Path:
        return self.settings.state_dir / "nft" / "legacy-claimed"

    def _claim_legacy(self, nets: list[NetworkConfig]) -> None:
        """Label this daemon's pre-identity links as its own, once, and plan to drop its old
        ``inet vzkit`` table. Proof of ownership: a bridge has the old alias naming one of
        our networks and that network's bridge name; an instance link has the name derived
        from one of our instances' uuids; the old table names no bridge but ours."""
        if self._legacy_mark.exists():
            return
        bridges = {n.bridge: n.name for n in nets if n.bridge}
        uuids = self.db.uuids()
        ports = {
            self.port_name(inst, uuids[inst.name], nic): (nic.network, inst.name)
            for inst in self.db.list()
            if inst.name in uuids
            for nic in inst.nics
        }
        for link in links.list_vzkit():
            if link.daemon is not None or (link.alias and not link.alias.startswith("vzkit:")):
                continue
            if link.kind == "bridge" and link.alias and bridges.get(link.name) == link.network:
                links.claim(link.name, daemon=self.daemon, network=bridges[link.name])
            elif link.name in ports and link.group == 0:
                network, instance = ports[link.name]
                links.claim(link.name, daemon=self.daemon, network=network, instance=instance)
            else:
                continue
            log.info("%s was made by this state dir before daemon identities: claimed", link.name)
        old = nft.legacy_bridges()
        if old is not None and old <= set(bridges):
            self._drop_legacy = True
            return
        if old is not None:
            log.warning(
                "table inet vzkit names %s, which are not this daemon's bridges: left alone "
                "(another vzkit daemon from before identities may use it)",
                ", ".join(sorted(old - set(bridges))),
            )
        self._legacy_mark.parent.mkdir(parents=True, exist_ok=True)
        self._legacy_mark.touch()

    def _legacy_done(self) -> None:
        if self._drop_legacy:
            self._drop_legacy = False
            log.info("removed table inet vzkit, this daemon's from before daemon identities")
            self._legacy_mark.touch()


_PROC_NET = {"tcp": ("tcp", "tcp6"), "udp": ("udp", "udp6")}


def _listening(port: int, proto: str) -> bool:
    """Whether a socket in this namespace is bound to ``port`` (TCP: listening)."""
    for table in _PROC_NET[proto]:
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            # TCP state 0A is LISTEN; a bound UDP socket shows 07 (it has no listen state).
            if int(local.rsplit(":", 1)[1], 16) == port and state in ("0A", "07"):
                return True
    return False
