"""The SDK's calls for networks, storage, snapshots, operations, events and usage, as a
mixin of :class:`vzkit.sdk.client.Client` (which provides the transport: ``_json``, ``_raw``,
``_ws``)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from vzkit.sdk._api import API, _parse, _q

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

    from vzkit.api.events import Event
    from vzkit.api.instances import Instance, InstanceStats
    from vzkit.api.networks import NetworkConfig
    from vzkit.api.operations import Operation
    from vzkit.api.remote import TrustCreated, TrustEntry
    from vzkit.api.snapshots import SnapshotInfo
    from vzkit.api.storage import PoolInfo, VolumeInfo


class Resources:
    if TYPE_CHECKING:

        def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any: ...
        def _raw(
            self, method: str, path: str, **kw: Any
        ) -> tuple[bytes, http.client.HTTPResponse]: ...
        def _ws(self, path: str, query: Mapping[str, Any] | None = None) -> ClientConnection: ...

    def stats(self) -> list[InstanceStats]:
        """Every instance's usage counters (CPU seconds, memory, disk and network bytes)."""
        return [_parse("InstanceStats", s) for s in self._json("GET", f"{API}/stats")]

    # -- background operations --------------------------------------------------------------

    def submit(self, method: str, path: str, body: Any = None, **query: Any) -> Operation:
        """Start any long call (create, state change, snapshot, restore, copy, delete) in
        the background: ``submit("POST", "/1.0/instances", {...})``; follow it with
        :meth:`wait_operation`."""
        data = self._json(method, path, body, query={**query, "background": True})
        result: Operation = _parse("Operation", data)
        return result

    def get_operation(self, op_id: str) -> Operation:
        result: Operation = _parse("Operation", self._json("GET", f"{API}/operations/{_q(op_id)}"))
        return result

    def list_operations(self) -> list[Operation]:
        return [_parse("Operation", o) for o in self._json("GET", f"{API}/operations")]

    def wait_operation(self, op_id: str, timeout: float | None = None) -> Operation:
        """The operation once finished (or as it is after ``timeout`` seconds)."""
        path = f"{API}/operations/{_q(op_id)}/wait"
        result: Operation = _parse("Operation", self._json("GET", path, query={"timeout": timeout}))
        return result

    def cancel_operation(self, op_id: str) -> Operation:
        path = f"{API}/operations/{_q(op_id)}"
        result: Operation = _parse("Operation", self._json("DELETE", path))
        return result

    # -- events -----------------------------------------------------------------------------

    def events(self, types: Sequence[str] | None = None) -> Iterator[Event]:
        """Lifecycle events as they happen (instance-created, instance-state, ...), until
        the caller stops iterating."""
        from websockets.exceptions import ConnectionClosed

        query = {"type": ",".join(types)} if types else None
        with self._ws(f"{API}/events", query) as ws, suppress(ConnectionClosed):
            while True:
                msg = ws.recv()
                yield _parse("Event", json.loads(msg))

    # -- storage ----------------------------------------------------------------------------

    def list_pools(self) -> list[PoolInfo]:
        return [_parse("PoolInfo", p) for p in self._json("GET", f"{API}/storage")]

    def get_pool(self, name: str) -> PoolInfo:
        result: PoolInfo = _parse("PoolInfo", self._json("GET", f"{API}/storage/{_q(name)}"))
        return result

    def create_pool(self, name: str, path: str | None = None) -> PoolInfo:
        body = {"name": name, "path": path}
        result: PoolInfo = _parse("PoolInfo", self._json("POST", f"{API}/storage", body))
        return result

    def delete_pool(self, name: str) -> None:
        self._raw("DELETE", f"{API}/storage/{_q(name)}")

    def list_volumes(self, pool: str | None = None) -> list[VolumeInfo]:
        data = self._json("GET", f"{API}/volumes", query={"pool": pool})
        return [_parse("VolumeInfo", v) for v in data]

    def get_volume(self, name: str, pool: str = "default") -> VolumeInfo:
        path = f"{API}/storage/{_q(pool)}/volumes/{_q(name)}"
        result: VolumeInfo = _parse("VolumeInfo", self._json("GET", path))
        return result

    def create_volume(
        self, name: str, size: int | str, *, pool: str = "default", content: str = "block"
    ) -> VolumeInfo:
        """A qcow2 disk (``block``, for VMs) or a directory (``filesystem``, containers)."""
        body = {"name": name, "size": size, "pool": pool, "content": content}
        result: VolumeInfo = _parse("VolumeInfo", self._json("POST", f"{API}/volumes", body))
        return result

    def resize_volume(self, name: str, size: int | str, *, pool: str = "default") -> VolumeInfo:
        path = f"{API}/storage/{_q(pool)}/volumes/{_q(name)}"
        result: VolumeInfo = _parse("VolumeInfo", self._json("PATCH", path, {"size": size}))
        return result

    def delete_volume(self, name: str, *, pool: str = "default") -> None:
        self._raw("DELETE", f"{API}/storage/{_q(pool)}/volumes/{_q(name)}")

    def attach_volume(
        self,
        name: str,
        volume: str,
        *,
        pool: str = "default",
        path: str | None = None,
        readonly: bool = False,
    ) -> Instance:
        """VMs: a disk (/dev/disk/by-id/virtio-VOLUME); containers: a mount at ``path``."""
        body = {"volume": volume, "pool": pool, "path": path, "readonly": readonly}
        return self._instance_call("POST", f"{API}/instances/{_q(name)}/volumes", body)

    def detach_volume(self, name: str, volume: str, *, pool: str = "default") -> Instance:
        path = f"{API}/instances/{_q(name)}/volumes/{_q(pool)}/{_q(volume)}"
        return self._instance_call("DELETE", path)

    # -- snapshots and copies ---------------------------------------------------------------

    def list_snapshots(self, name: str) -> list[SnapshotInfo]:
        data = self._json("GET", f"{API}/instances/{_q(name)}/snapshots")
        return [_parse("SnapshotInfo", s) for s in data]

    def get_snapshot(self, name: str, snapshot: str) -> SnapshotInfo:
        path = f"{API}/instances/{_q(name)}/snapshots/{_q(snapshot)}"
        result: SnapshotInfo = _parse("SnapshotInfo", self._json("GET", path))
        return result

    def create_snapshot(
        self, name: str, snapshot: str | None = None, *, stateful: bool = False
    ) -> SnapshotInfo:
        """Snapshot the disk (or a container's files); ``stateful`` adds the running memory."""
        body = {"name": snapshot, "stateful": stateful}
        path = f"{API}/instances/{_q(name)}/snapshots"
        result: SnapshotInfo = _parse("SnapshotInfo", self._json("POST", path, body))
        return result

    def restore_snapshot(self, name: str, snapshot: str) -> Instance:
        path = f"{API}/instances/{_q(name)}/snapshots/{_q(snapshot)}/restore"
        return self._instance_call("POST", path)

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        self._raw("DELETE", f"{API}/instances/{_q(name)}/snapshots/{_q(snapshot)}")

    def copy_instance(self, name: str, new_name: str) -> Instance:
        """A stopped copy-on-write copy of ``name`` (its disk is shared until written)."""
        return self._instance_call("POST", f"{API}/instances/{_q(name)}/copy", {"name": new_name})

    # -- networks ---------------------------------------------------------------------------

    def list_networks(self) -> list[NetworkConfig]:
        return [_parse("NetworkConfig", n) for n in self._json("GET", f"{API}/networks")]

    def get_network(self, name: str) -> NetworkConfig:
        result: NetworkConfig = _parse(
            "NetworkConfig", self._json("GET", f"{API}/networks/{_q(name)}")
        )
        return result

    def create_network(self, config: NetworkConfig | Mapping[str, Any]) -> NetworkConfig:
        payload = dict(config) if isinstance(config, Mapping) else config.model_dump(mode="json")
        result: NetworkConfig = _parse(
            "NetworkConfig", self._json("POST", f"{API}/networks", payload)
        )
        return result

    def update_network(self, name: str, **changes: Any) -> NetworkConfig:
        """Change a network's isolation or DNS domain: ``update_network("lab", isolated=True)``."""
        result: NetworkConfig = _parse(
            "NetworkConfig", self._json("PATCH", f"{API}/networks/{_q(name)}", changes)
        )
        return result

    def delete_network(self, name: str) -> None:
        self._raw("DELETE", f"{API}/networks/{_q(name)}")

    def _instance_call(self, method: str, path: str, payload: Any = None, **kw: Any) -> Instance:
        result: Instance = _parse("Instance", self._json(method, path, payload, **kw))
        return result

    def attach_network(
        self, name: str, network: str, *, ip: str | None = None, mac: str | None = None
    ) -> Instance:
        """Give an instance an interface on ``network`` (live for running containers)."""
        nic = {"network": network} | ({"ip": ip} if ip else {}) | ({"mac": mac} if mac else {})
        return self._instance_call("POST", f"{API}/instances/{_q(name)}/nics", nic)

    def detach_network(self, name: str, network: str) -> Instance:
        return self._instance_call("DELETE", f"{API}/instances/{_q(name)}/nics/{_q(network)}")

    def add_port(self, name: str, host_port: int, port: int, proto: str = "tcp") -> Instance:
        """Forward ``host_port`` on every host address (127.0.0.1 too) to the instance's port."""
        body = {"host_port": host_port, "port": port, "proto": proto}
        return self._instance_call("POST", f"{API}/instances/{_q(name)}/ports", body)

    def remove_port(self, name: str, host_port: int, proto: str = "tcp") -> Instance:
        path = f"{API}/instances/{_q(name)}/ports/{host_port}"
        return self._instance_call("DELETE", path, query={"proto": proto})

    def set_firewall(self, name: str, rules: Sequence[Mapping[str, Any]] | None) -> Instance:
        """Replace the ingress allow-list; None lets everything in, [] lets nothing in."""
        body = {"rules": None if rules is None else [dict(r) for r in rules]}
        return self._instance_call("PUT", f"{API}/instances/{_q(name)}/firewall", body)

    def add_firewall_rule(
        self,
        name: str,
        *,
        source: str = "0.0.0.0/0",
        proto: str | None = None,
        port: int | None = None,
    ) -> Instance:
        """Allow ingress from ``source`` (optionally one protocol and port); from the first
        rule on, whatever no rule allows is dropped."""
        rule = {"source": source, "proto": proto, "port": port}
        return self._instance_call("POST", f"{API}/instances/{_q(name)}/firewall/rules", rule)

    def remove_firewall_rule(self, name: str, index: int) -> Instance:
        return self._instance_call("DELETE", f"{API}/instances/{_q(name)}/firewall/rules/{index}")

    # -- remote access ----------------------------------------------------------------------

    def server_config(self) -> dict[str, Any]:
        """The TLS listener: ``{"listen", "addresses", "ca_fingerprint", ...}``."""
        config: dict[str, Any] = self._json("GET", f"{API}/server")
        return config

    def set_listen(self, address: str | None) -> dict[str, Any]:
        """Serve the API over TLS on ``address`` (``HOST:PORT``, ``:PORT``); None: stop."""
        config: dict[str, Any] = self._json("PATCH", f"{API}/server", {"listen": address})
        return config

    def list_trust(self) -> list[TrustEntry]:
        from vzkit.api.remote import TrustEntry

        return [TrustEntry.model_validate(e) for e in self._json("GET", f"{API}/trust")]

    def add_trust(
        self, name: str, type: str = "certificate", expires_in: int | None = None
    ) -> TrustCreated:
        """A join token (``certificate``: for `vz remote add`) or a bearer ``token``; the
        secret is in the answer only."""
        from vzkit.api.remote import TrustCreated

        body = {"name": name, "type": type, "expires_in": expires_in}
        return TrustCreated.model_validate(self._json("POST", f"{API}/trust", body))

    def remove_trust(self, name: str) -> None:
        """Revoke at once: the next request with that certificate or token is refused."""
        self._raw("DELETE", f"{API}/trust/{_q(name)}")
