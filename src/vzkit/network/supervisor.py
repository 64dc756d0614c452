"""Putting back, within seconds, what vanished from a daemon's networks from outside.

The daemon calls :meth:`Supervisor.tick` every second (under its network lock, so never
while it changes its own networks). A healthy tick costs one netlink link dump, one
netlink message for the ruleset generation (an ``nft list ruleset`` only when some
transaction happened since), a database read and a /proc read per dnsmasq. What it repairs:

* **a vanished bridge**: made again (same name, address and pinned MAC, so the instances'
  ARP caches stay right), the instances' links that still exist put back on it, dnsmasq
  restarted (it was bound to the old interface) and the nft tables re-applied (the
  bridge's sysctls went with it).
* **an instance link off its bridge or down** (a running or paused instance's): put back.
* **a vanished link of a running instance**, once it is seen missing on two ticks in a
  row with the same instance record (an instance operation that deletes and re-records a
  link takes milliseconds, so this never races one):
  - a container's veth: deleting either end deletes the pair, so the pair is made again
    into the container's namespace, with its MAC, address and default route (routes the
    container added itself are gone with the interface);
  - a VM's TAP: QEMU still holds the file of the deleted device, and TUNSETIFF on that file
    makes a new device around it (``links.reattach_taps``), so the guest's NIC works again
    without a restart. That needs exactly as many detached descriptors in QEMU as vanished
    TAPs; otherwise the VM needs a restart to get its NIC back, and the log says so once.
  - Stopped instances have no host link to keep (a VM's TAP is made again when it starts).
* **our nft tables altered or deleted**, or ``ip_forward`` turned off under a NAT network:
  the tables are compared with the kernel's listing taken right after the last apply, and
  re-applied whole.
* **a dead dnsmasq**: restarted (it is not vzd's child: it outlives vzd).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vzkit._proc import alive
from vzkit.api.instances import Instance, InstanceState, InstanceType
from vzkit.api.networks import NetworkConfig
from vzkit.errors import VzError
from vzkit.network import links, nft, nics
from vzkit.network._netns import read_sysctl

if TYPE_CHECKING:
    from vzkit.network.manager import NetworkManager

log = logging.getLogger(__name__)

_LIVE = frozenset({InstanceState.RUNNING, InstanceState.PAUSED})


class Supervisor:
    def __init__(self, manager: NetworkManager) -> None:
        self.m = manager
        # instance -> (pid, missing link names) seen on the previous tick.
        self._suspects: dict[str, tuple[int | None, tuple[str, ...]]] = {}
        # Problems already logged (a bridge name another daemon holds, a VM that needs a
        # restart): said once, not every second.
        self._reported: set[str] = set()

    def tick(self) -> list[str]:
        nets = self.m.all()
        repairs: list[str] = []
        rebuilt: set[str] = set()
        if nets:
            present = links.list_links()
            rebuilt = self._bridges(nets, present, repairs)
            if rebuilt:
                present = links.list_links()
            self._ports(nets, present, rebuilt, repairs)
            self._rules(bool(rebuilt), repairs)
        self._dnsmasq(nets, rebuilt, repairs)
        for what in repairs:
            log.warning("%s", what)
        return repairs

    def _report(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("%s", message)

    def _bridges(
        self, nets: list[NetworkConfig], present: dict[str, links.LinkInfo], repairs: list[str]
    ) -> set[str]:
        rebuilt = set()
        for net in nets:
            if net.bridge is None or net.bridge in present:
                self._reported.discard(f"bridge:{net.name}")
                continue
            try:
                self.m.ensure_bridge(net)
            except VzError as exc:
                self._report(
                    f"bridge:{net.name}",
                    f"bridge {net.bridge} of network {net.name} vanished and cannot be made "
                    f"again: {exc.message} ({exc.hint})",
                )
                continue
            rebuilt.add(net.name)
            repairs.append(f"bridge {net.bridge} of network {net.name} had vanished: made again")
        return rebuilt

    def _ports(
        self,
        nets: list[NetworkConfig],
        present: dict[str, links.LinkInfo],
        rebuilt: set[str],
        repairs: list[str],
    ) -> None:
        by_name = {n.name: n for n in nets}
        uuids = self.m.db.uuids()
        suspects: dict[str, tuple[int | None, tuple[str, ...]]] = {}
        for inst in self.m.db.list(_LIVE):
            if not inst.nics or inst.pid is None or inst.name not in uuids:
                continue
            tap = inst.type is not InstanceType.CONTAINER
            try:
                plan = nics.plan(
                    inst.name, uuids[inst.name], inst.nics, by_name, tap=tap, daemon=self.m.daemon
                )
            except VzError:
                continue
            missing = []
            for nic in plan.nics:
                link = present.get(nic.host_name)
                bridge = present.get(nic.bridge)
                if link is None:
                    missing.append(nic)
                elif bridge is not None and (link.master != bridge.index or not link.up):
                    self._reattach(nic, repairs)
            if missing:
                key = (inst.pid, tuple(n.host_name for n in missing))
                if self._suspects.get(inst.name) == key:
                    self._replug(inst, missing, repairs)
                else:
                    suspects[inst.name] = key
        self._suspects = suspects

    def _reattach(self, nic: nics.NicPlan, repairs: list[str]) -> bool:
        try:
            links.attach(
                nic.host_name,
                bridge=nic.bridge,
                daemon=self.m.daemon,
                network=nic.network,
                instance=nic.instance,
            )
        except VzError as exc:
            self._report(f"port:{nic.host_name}", f"cannot put {nic.host_name} back: {exc}")
            return False
        self._reported.discard(f"port:{nic.host_name}")
        repairs.append(f"{nic.host_name} of {nic.instance} was off bridge {nic.bridge}: put back")
        return True

    def _replug(self, inst: Instance, missing: list[nics.NicPlan], repairs: list[str]) -> None:
        assert inst.pid is not None
        if not alive(inst.pid):
            return  # it is ending (its links went with it): the exit handler records it
        names = ", ".join(n.host_name for n in missing)
        try:
            if inst.type is InstanceType.CONTAINER:
                for nic in missing:
                    nics.plug_veth(inst.pid, nic)
            elif links.reattach_taps(inst.pid, [n.host_name for n in missing]):
                for nic in missing:
                    # Made through QEMU's file: label it ours before it joins the bridge.
                    links.claim(
                        nic.host_name,
                        daemon=self.m.daemon,
                        network=nic.network,
                        instance=nic.instance,
                    )
                    if not self._reattach(nic, []):
                        return
            else:
                self._report(
                    f"vm:{inst.name}:{names}",
                    f"TAP {names} of VM {inst.name} vanished and cannot be made again under "
                    f"its running QEMU: its NIC is dead until a restart (vz restart {inst.name})",
                )
                return
        except VzError as exc:
            self._report(f"replug:{inst.name}", f"cannot re-plug {inst.name}: {exc}")
            return
        kind = "veth" if inst.type is InstanceType.CONTAINER else "TAP"
        repairs.append(f"{kind} {names} of {inst.name} had vanished: made again")

    def _rules(self, rebuilt: bool, repairs: list[str]) -> None:
        changed = self._rules_changed()
        if not (rebuilt or changed):
            return
        try:
            self.m.apply_rules(force=True)
        except VzError as exc:
            self._report("rules", f"cannot re-apply the nft tables: {exc}")
            return
        self._reported.discard("rules")
        if changed:
            repairs.append(f"{changed}: re-applied the nft tables and their sysctls")

    def _rules_changed(self) -> str | None:
        """What changed under our rules since the last apply, or None."""
        if self.m.listing is None:
            return "the nft tables were never applied"
        if self.m.needs_forwarding and read_sysctl("net.ipv4.ip_forward") != "1":
            return "net.ipv4.ip_forward had been turned off"
        gen = nft.generation()
        if gen == self.m.generation:
            return None  # no nft transaction at all since we looked
        if nft.listing(self.m.daemon) != self.m.listing:
            return "the nft tables had been changed from outside"
        self.m.generation = gen  # another daemon's transaction: ours are as they were
        return None

    def _dnsmasq(self, nets: list[NetworkConfig], rebuilt: set[str], repairs: list[str]) -> None:
        for net in nets:
            dns = self.m.dns(net)
            try:
                if net.name in rebuilt:
                    dns.stop()  # bound to the interface that is gone
                    dns.start()
                elif dns.ensure():
                    repairs.append(f"dnsmasq of network {net.name} had died: restarted it")
                self._reported.discard(f"dns:{net.name}")
            except Exception as exc:
                self._report(f"dns:{net.name}", f"cannot restart dnsmasq of {net.name}: {exc}")
