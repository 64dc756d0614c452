"""The SDK's calls for networks, storage, snapshots, operations, events, usage and remote
access, as a mixin of :class:`vzkit.sdk.client.Client` (which provides ``_json``, ``_raw``
and ``_ws`` over its transport). Each answer is parsed into its model from vzkit.api, imported
once the request is under way: the CLI loads no pydantic before its first request."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from vzkit.sdk._api import API, parse, parse_list, q

if TYPE_CHECKING:
    from vzkit.api.events import Event
    from vzkit.api.instances import Instance, InstanceStats
    from vzkit.api.networks import NetworkConfig
    from vzkit.api.operations import Operation
    from vzkit.api.remote import ListenerInfo, TrustCreated, TrustEntry
    from vzkit.api.snapshots import SnapshotInfo
    from vzkit.api.storage import PoolInfo, VolumeInfo
    from vzkit.sdk.transport import Response, WebSocket


class Resources:
    if TYPE_CHECKING:

        def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any: ...
        def _raw(self, method: str, path: str, **kw: Any) -> tuple[bytes, Response]: ...
        def _ws(self, path: str, query: Mapping[str, Any] | None = None) -> WebSocket: ...

    def stats(self) -> list[InstanceStats]:
        """Every instance's usage counters (CPU seconds, memory, disk and network bytes)."""
        data, _ = self._raw("GET", f"{API}/stats")
        from vzkit.api.instances import InstanceStats

        return parse_list(InstanceStats, data)

    # -- background operations --------------------------------------------------------------

    def submit(self, method: str, path: str, body: Any = None, **query: Any) -> Operation:
        """Start any long call (create, state change, snapshot, restore, copy, delete) in
        the background: ``submit("POST", "/1.0/instances", {...})``; follow it with
        :meth:`wait_operation`."""
        return self._operation(method, path, body, query={**query, "background": True})

    def get_operation(self, op_id: str) -> Operation:
        return self._operation("GET", f"{API}/operations/{q(op_id)}")

    def list_operations(self) -> list[Operation]:
        data, _ = self._raw("GET", f"{API}/operations")
        from vzkit.api.operations import Operation

        return parse_list(Operation, data)

    def wait_operation(self, op_id: str, timeout: float | None = None) -> Operation:
        """The operation once finished (or as it is after ``timeout`` seconds)."""
        path = f"{API}/operations/{q(op_id)}/wait"
        return self._operation("GET", path, query={"timeout": timeout})

    def cancel_operation(self, op_id: str) -> Operation:
        return self._operation("DELETE", f"{API}/operations/{q(op_id)}")

    def _operation(self, method: str, path: str, payload: Any = None, **kw: Any) -> Operation:
        data = self._json(method, path, payload, **kw)
        from vzkit.api.operations import Operation

        return parse(Operation, data)

    # -- events -----------------------------------------------------------------------------

    def events(self, types: Sequence[str] | None = None) -> Iterator[Event]:
        """Lifecycle events as they happen (instance-created, instance-state, ...), until
        the caller stops iterating."""
        from websockets.exceptions import ConnectionClosed

        query = {"type": ",".join(types)} if types else None
        with self._ws(f"{API}/events", query) as ws, suppress(ConnectionClosed):
            from vzkit.api.events import Event

            while True:
                msg = ws.recv()
                yield parse(Event, json.loads(msg))

    # -- storage ----------------------------------------------------------------------------

    def list_pools(self) -> list[PoolInfo]:
        data, _ = self._raw("GET", f"{API}/storage")
        from vzkit.api.storage import PoolInfo

        return parse_list(PoolInfo, data)

    def get_pool(self, name: str) -> PoolInfo:
        return self._pool("GET", f"{API}/storage/{q(name)}")

    def create_pool(self, name: str, path: str | None = None) -> PoolInfo:
        return self._pool("POST", f"{API}/storage", {"name": name, "path": path})

    def _pool(self, method: str, path: str, payload: Any = None) -> PoolInfo:
        data = self._json(method, path, payload)
        from vzkit.api.storage import PoolInfo

        return parse(PoolInfo, data)

    def delete_pool(self, name: str) -> None:
        self._raw("DELETE", f"{API}/storage/{q(name)}")

    def list_volumes(self, pool: str | None = None) -> list[VolumeInfo]:
        data, _ = self._raw("GET", f"{API}/volumes", query={"pool": pool})
        from vzkit.api.storage import VolumeInfo

        return parse_list(VolumeInfo, data)

    def get_volume(self, name: str, pool: str = "default") -> VolumeInfo:
        return self._volume("GET", f"{API}/storage/{q(pool)}/volumes/{q(name)}")

    def create_volume(
        self, name: str, size: int | str, *, pool: str = "default", content: str = "block"
    ) -> VolumeInfo:
        """A qcow2 disk (``block``, for VMs) or a directory (``filesystem``, containers)."""
        body = {"name": name, "size": size, "pool": pool, "content": content}
        return self._volume("POST", f"{API}/volumes", body)

    def resize_volume(self, name: str, size: int | str, *, pool: str = "default") -> VolumeInfo:
        path = f"{API}/storage/{q(pool)}/volumes/{q(name)}"
        return self._volume("PATCH", path, {"size": size})

    def _volume(self, method: str, path: str, payload: Any = None) -> VolumeInfo:
        data = self._json(method, path, payload)
        from vzkit.api.storage import VolumeInfo

        return parse(VolumeInfo, data)

    def delete_volume(self, name: str, *, pool: str = "default") -> None:
        self._raw("DELETE", f"{API}/storage/{q(pool)}/volumes/{q(name)}")

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
        return self._instance_call("POST", f"{API}/instances/{q(name)}/volumes", body)

    def detach_volume(self, name: str, volume: str, *, pool: str = "default") -> Instance:
        path = f"{API}/instances/{q(name)}/volumes/{q(pool)}/{q(volume)}"
        return self._instance_call("DELETE", path)

    # -- snapshots and copies ---------------------------------------------------------------

    def list_snapshots(self, name: str) -> list[SnapshotInfo]:
        data, _ = self._raw("GET", f"{API}/instances/{q(name)}/snapshots")
        from vzkit.api.snapshots import SnapshotInfo

        return parse_list(SnapshotInfo, data)

    def get_snapshot(self, name: str, snapshot: str) -> SnapshotInfo:
        return self._snapshot("GET", f"{API}/instances/{q(name)}/snapshots/{q(snapshot)}")

    def create_snapshot(
        self, name: str, snapshot: str | None = None, *, stateful: bool = False
    ) -> SnapshotInfo:
        """Snapshot the disk (or a container's files); ``stateful`` adds the running memory."""
        body = {"name": snapshot, "stateful": stateful}
        return self._snapshot("POST", f"{API}/instances/{q(name)}/snapshots", body)

    def _snapshot(self, method: str, path: str, payload: Any = None) -> SnapshotInfo:
        data = self._json(method, path, payload)
        from vzkit.api.snapshots import SnapshotInfo

        return parse(SnapshotInfo, data)

    def restore_snapshot(self, name: str, snapshot: str) -> Instance:
        path = f"{API}/instances/{q(name)}/snapshots/{q(snapshot)}/restore"
        return self._instance_call("POST", path)

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        self._raw("DELETE", f"{API}/instances/{q(name)}/snapshots/{q(snapshot)}")

    def copy_instance(self, name: str, new_name: str) -> Instance:
        """A stopped copy-on-write copy of ``name`` (its disk is shared until written)."""
        return self._instance_call("POST", f"{API}/instances/{q(name)}/copy", {"name": new_name})

    # -- networks ---------------------------------------------------------------------------

    def list_networks(self) -> list[NetworkConfig]:
        data, _ = self._raw("GET", f"{API}/networks")
        from vzkit.api.networks import NetworkConfig

        return parse_list(NetworkConfig, data)

    def get_network(self, name: str) -> NetworkConfig:
        return self._network("GET", f"{API}/networks/{q(name)}")

    def create_network(self, config: NetworkConfig | Mapping[str, Any]) -> NetworkConfig:
        payload = dict(config) if isinstance(config, Mapping) else config.model_dump(mode="json")
        return self._network("POST", f"{API}/networks", payload)

    def update_network(self, name: str, **changes: Any) -> NetworkConfig:
        """Change a network's isolation or DNS domain: ``update_network("lab", isolated=True)``."""
        return self._network("PATCH", f"{API}/networks/{q(name)}", changes)

    def _network(self, method: str, path: str, payload: Any = None) -> NetworkConfig:
        data = self._json(method, path, payload)
        from vzkit.api.networks import NetworkConfig

        return parse(NetworkConfig, data)

    def delete_network(self, name: str) -> None:
        self._raw("DELETE", f"{API}/networks/{q(name)}")

    def _instance_call(self, method: str, path: str, payload: Any = None, **kw: Any) -> Instance:
        data = self._json(method, path, payload, **kw)
        from vzkit.api.instances import Instance

        return parse(Instance, data)

    def attach_network(
        self, name: str, network: str, *, ip: str | None = None, mac: str | None = None
    ) -> Instance:
        """Give an instance an interface on ``network`` (live for running containers)."""
        nic = {"network": network} | ({"ip": ip} if ip else {}) | ({"mac": mac} if mac else {})
        return self._instance_call("POST", f"{API}/instances/{q(name)}/nics", nic)

    def detach_network(self, name: str, network: str) -> Instance:
        return self._instance_call("DELETE", f"{API}/instances/{q(name)}/nics/{q(network)}")

    def add_port(self, name: str, host_port: int, port: int, proto: str = "tcp") -> Instance:
        """Forward ``host_port`` on every host address (127.0.0.1 too) to the instance's port."""
        body = {"host_port": host_port, "port": port, "proto": proto}
        return self._instance_call("POST", f"{API}/instances/{q(name)}/ports", body)

    def remove_port(self, name: str, host_port: int, proto: str = "tcp") -> Instance:
        path = f"{API}/instances/{q(name)}/ports/{host_port}"
        return self._instance_call("DELETE", path, query={"proto": proto})

    def set_firewall(self, name: str, rules: Sequence[Mapping[str, Any]] | None) -> Instance:
        """Replace the ingress allow-list; None lets everything in, [] lets nothing in."""
        body = {"rules": None if rules is None else [dict(r) for r in rules]}
        return self._instance_call("PUT", f"{API}/instances/{q(name)}/firewall", body)

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
        return self._instance_call("POST", f"{API}/instances/{q(name)}/firewall/rules", rule)

    def remove_firewall_rule(self, name: str, index: int) -> Instance:
        return self._instance_call("DELETE", f"{API}/instances/{q(name)}/firewall/rules/{index}")

    # -- remote access ----------------------------------------------------------------------

    def server_config(self) -> ListenerInfo:
        """The TLS listener: where it listens, its addresses, the CA's fingerprint."""
        return self._listener("GET", f"{API}/server")

    def set_listen(self, address: str | None) -> ListenerInfo:
        """Serve the API over TLS on ``address`` (``HOST:PORT``, ``:PORT``); None: stop."""
        return self._listener("PATCH", f"{API}/server", {"listen": address})

    def _listener(self, method: str, path: str, payload: Any = None) -> ListenerInfo:
        data = self._json(method, path, payload)
        from vzkit.api.remote import ListenerInfo

        return parse(ListenerInfo, data)

    def list_trust(self) -> list[TrustEntry]:
        data, _ = self._raw("GET", f"{API}/trust")
        from vzkit.api.remote import TrustEntry

        return parse_list(TrustEntry, data)

    def add_trust(
        self, name: str, type: str = "certificate", expires_in: int | None = None
    ) -> TrustCreated:
        """A join token (``certificate``: for `vz remote add`) or a bearer ``token``; the
        secret is in the answer only."""
        from vzkit.api.remote import TrustCreated

        body = {"name": name, "type": type, "expires_in": expires_in}
        return parse(TrustCreated, self._json("POST", f"{API}/trust", body))

    def remove_trust(self, name: str) -> None:
        """Revoke at once: the next request with that certificate or token is refused."""
        self._raw("DELETE", f"{API}/trust/{q(name)}")
