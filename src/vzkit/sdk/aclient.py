"""The SDK for asyncio code: :class:`AsyncClient`, every :class:`Client` call as a coroutine.

vzd's API is served on a unix socket and the sync client is the reference; each call here
runs the sync client's method of the same name in a worker thread (the sync client keeps one
connection per thread), so an event loop is never blocked and both stay the same API. The
methods are written out, each with its signature and return type, so type checkers and
editors see them; ``tests/unit/sdk/test_aclient.py`` holds the two classes to the same calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ParamSpec, TypeVar

from vzkit.sdk.client import Client, ProgressCallback

if TYPE_CHECKING:
    from vzkit.api.events import Event
    from vzkit.api.host import HostInfo
    from vzkit.api.instances import (
        ExecResult,
        ImageInfo,
        Instance,
        InstanceCreate,
        InstanceStats,
        InstanceUpdate,
        StateChange,
    )
    from vzkit.api.networks import NetworkConfig
    from vzkit.api.operations import Operation
    from vzkit.api.remote import ListenerInfo, ServerInfo, TrustCreated, TrustEntry
    from vzkit.api.snapshots import SnapshotInfo
    from vzkit.api.storage import PoolInfo, VolumeInfo
    from vzkit.sdk.remotes import Remote
    from vzkit.sdk.transport import Transport
    from vzkit.settings import Settings

__all__ = ["AsyncClient", "AsyncEphemeralInstance"]

P = ParamSpec("P")
T = TypeVar("T")
_DONE = object()


async def _iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Items of a blocking iterator, made and read in one thread of its own (a streamed
    answer belongs to the thread whose connection carries it)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in make():
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if stop.is_set():
                    break
        except BaseException as exc:  # handed to the reader
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    threading.Thread(target=pump, name="vz-aiter", daemon=True).start()
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class AsyncClient:
    """``await client.list_instances()``, ``await client.create_instance({...})``, ... and
    ``async for event in client.events()``; see :class:`vzkit.sdk.client.Client` for each call."""

    def __init__(
        self,
        socket_path: Path | None = None,
        *,
        settings: Settings | None = None,
        autostart: bool = True,
        timeout: float = 300,
        remote: str | Remote | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.sync = Client(
            socket_path,
            settings=settings,
            autostart=autostart,
            timeout=timeout,
            remote=remote,
            transport=transport,
        )

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def close(self) -> None:
        await self._call(self.sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- calls that stream or hold a block ------------------------------------------------

    @asynccontextmanager
    async def run(
        self, image: str = "minimal", **create_kwargs: Any
    ) -> AsyncIterator[AsyncEphemeralInstance]:
        """Create and start an ephemeral instance; force-delete it on exit, whatever happened."""
        body: dict[str, Any] = {"image": image, "ephemeral": True, "start": True}
        body.update(create_kwargs)
        inst = await self.create_instance(body)
        try:
            yield AsyncEphemeralInstance(self, inst)
        finally:
            await self.delete_quietly(inst.name)

    async def events(self, types: Sequence[str] | None = None) -> AsyncIterator[Event]:
        """Lifecycle events as they happen (the sync iterator, read in a thread)."""
        async for event in _iterate_in_thread(lambda: self.sync.events(types)):
            yield event

    async def pull_file(self, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """The file's mode and its content, read as it is consumed."""
        modes: list[int] = []

        def chunks() -> Iterator[bytes]:
            mode, it = self.sync.pull_file(name, path)
            modes.append(mode)
            yield b""  # the mode is known now
            yield from it

        content = _iterate_in_thread(chunks)
        await anext(content)
        return modes[0], content

    # -- one call each, run in a worker thread --------------------------------------------

    async def is_running(self) -> bool:
        """Whether something accepts connections there (no autostart)."""
        return await self._call(self.sync.is_running)

    async def start_daemon(self) -> int:
        """Spawn vzd detached and wait for its socket; return the child's pid."""
        return await self._call(self.sync.start_daemon)

    async def server_info(self) -> ServerInfo:
        """Versions, whether vzd trusts this caller, and (trusted) its pid."""
        return await self._call(self.sync.server_info)

    async def host_info(self, refresh: bool = False) -> HostInfo:
        """What vzd found out about its host; ``refresh`` probes again."""
        return await self._call(self.sync.host_info, refresh)

    async def shutdown_daemon(self, *, wait: bool = True, timeout: float = 15.0) -> None:
        """Ask vzd to exit (instances keep running); optionally wait until it has exited."""
        return await self._call(self.sync.shutdown_daemon, wait=wait, timeout=timeout)

    async def list_instances(self) -> list[Instance]:
        return await self._call(self.sync.list_instances)

    async def get_instance(self, name: str) -> Instance:
        return await self._call(self.sync.get_instance, name)

    async def create_instance(self, req: InstanceCreate | Mapping[str, Any]) -> Instance:
        """Create (and with ``start``, boot) an instance; answers once its agent is ready."""
        return await self._call(self.sync.create_instance, req)

    async def delete_instance(self, name: str, force: bool = False) -> None:
        return await self._call(self.sync.delete_instance, name, force)

    async def update_instance(
        self, name: str, change: InstanceUpdate | Mapping[str, Any]
    ) -> Instance:
        """Change limits, e.g. ``{"limits": {"memory": "512MiB"}}``; live where possible."""
        return await self._call(self.sync.update_instance, name, change)

    async def change_state(self, name: str, change: StateChange | Mapping[str, Any]) -> Instance:
        return await self._call(self.sync.change_state, name, change)

    async def start(self, name: str) -> Instance:
        return await self._call(self.sync.start, name)

    async def stop(self, name: str, force: bool = False, timeout: float = 30) -> Instance:
        return await self._call(self.sync.stop, name, force, timeout)

    async def restart(self, name: str, force: bool = False, timeout: float = 30) -> Instance:
        return await self._call(self.sync.restart, name, force, timeout)

    async def pause(self, name: str) -> Instance:
        return await self._call(self.sync.pause, name)

    async def resume(self, name: str) -> Instance:
        return await self._call(self.sync.resume, name)

    async def delete_quietly(self, name: str, *, wait: float = 10.0) -> None:
        return await self._call(self.sync.delete_quietly, name, wait=wait)

    async def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | BinaryIO | None = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        tty: bool = False,
        timeout: float | None = None,
    ) -> ExecResult:
        return await self._call(
            self.sync.exec,
            name,
            argv,
            env=env,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            tty=tty,
            timeout=timeout,
        )

    async def exec_capture(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | BinaryIO | None = None,
        timeout: float | None = None,
        tty: bool = False,
    ) -> tuple[ExecResult, bytes, bytes]:
        """Run argv and return ``(result, stdout, stderr)`` (with a tty, all is stdout)."""
        return await self._call(
            self.sync.exec_capture,
            name,
            argv,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=timeout,
            tty=tty,
        )

    async def exec_interactive(
        self,
        name: str,
        argv: Sequence[str],
        *,
        tty: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run argv attached to this process's terminal (``vz shell``, ``vz exec -t``)."""
        return await self._call(
            self.sync.exec_interactive, name, argv, tty=tty, env=env, cwd=cwd, timeout=timeout
        )

    async def console(self, name: str, *, history: bool = True) -> None:
        """Attach this terminal to the instance's serial console until Ctrl-] is pressed."""
        return await self._call(self.sync.console, name, history=history)

    async def console_log(self, name: str) -> bytes:
        return await self._call(self.sync.console_log, name)

    async def push_file(
        self,
        name: str,
        path: str,
        data: bytes | BinaryIO,
        mode: int = 0o644,
        parents: bool = False,
        *,
        allow_setid: bool = False,
    ) -> None:
        return await self._call(
            self.sync.push_file, name, path, data, mode, parents, allow_setid=allow_setid
        )

    async def list_images(self) -> list[ImageInfo]:
        return await self._call(self.sync.list_images)

    async def get_image(self, name: str) -> ImageInfo:
        return await self._call(self.sync.get_image, name)

    async def has_image(self, name: str) -> bool:
        return await self._call(self.sync.has_image, name)

    async def build_image(
        self, name: str, force: bool = False, progress: ProgressCallback | None = None
    ) -> ImageInfo:
        """Build an image, reporting ``(step, fraction)`` as the daemon streams them."""
        return await self._call(self.sync.build_image, name, force, progress)

    async def publish_instance(
        self, name: str, image: str, progress: ProgressCallback | None = None
    ) -> ImageInfo:
        """Turn a VM's disk into a new image (its kernel and initramfs are its image's)."""
        return await self._call(self.sync.publish_instance, name, image, progress)

    async def export_instance(
        self, name: str, out: BinaryIO, progress: ProgressCallback | None = None
    ) -> int:
        return await self._call(self.sync.export_instance, name, out, progress)

    async def import_instance(self, data: BinaryIO, name: str | None = None) -> Instance:
        """Create an instance from an archive made by :meth:`export_instance`."""
        return await self._call(self.sync.import_instance, data, name)

    async def delete_image(self, name: str) -> None:
        return await self._call(self.sync.delete_image, name)

    async def stats(self) -> list[InstanceStats]:
        """Every instance's usage counters (CPU seconds, memory, disk and network bytes)."""
        return await self._call(self.sync.stats)

    async def submit(self, method: str, path: str, body: Any = None, **query: Any) -> Operation:
        """Start any long call (create, state change, snapshot, restore, copy, delete) in"""
        return await self._call(self.sync.submit, method, path, body, **query)

    async def get_operation(self, op_id: str) -> Operation:
        return await self._call(self.sync.get_operation, op_id)

    async def list_operations(self) -> list[Operation]:
        return await self._call(self.sync.list_operations)

    async def wait_operation(self, op_id: str, timeout: float | None = None) -> Operation:
        """The operation once finished (or as it is after ``timeout`` seconds)."""
        return await self._call(self.sync.wait_operation, op_id, timeout)

    async def cancel_operation(self, op_id: str) -> Operation:
        return await self._call(self.sync.cancel_operation, op_id)

    async def list_pools(self) -> list[PoolInfo]:
        return await self._call(self.sync.list_pools)

    async def get_pool(self, name: str) -> PoolInfo:
        return await self._call(self.sync.get_pool, name)

    async def create_pool(self, name: str, path: str | None = None) -> PoolInfo:
        return await self._call(self.sync.create_pool, name, path)

    async def delete_pool(self, name: str) -> None:
        return await self._call(self.sync.delete_pool, name)

    async def list_volumes(self, pool: str | None = None) -> list[VolumeInfo]:
        return await self._call(self.sync.list_volumes, pool)

    async def get_volume(self, name: str, pool: str = "default") -> VolumeInfo:
        return await self._call(self.sync.get_volume, name, pool)

    async def create_volume(
        self, name: str, size: int | str, *, pool: str = "default", content: str = "block"
    ) -> VolumeInfo:
        """A qcow2 disk (``block``, for VMs) or a directory (``filesystem``, containers)."""
        return await self._call(self.sync.create_volume, name, size, pool=pool, content=content)

    async def resize_volume(
        self, name: str, size: int | str, *, pool: str = "default"
    ) -> VolumeInfo:
        return await self._call(self.sync.resize_volume, name, size, pool=pool)

    async def delete_volume(self, name: str, *, pool: str = "default") -> None:
        return await self._call(self.sync.delete_volume, name, pool=pool)

    async def attach_volume(
        self,
        name: str,
        volume: str,
        *,
        pool: str = "default",
        path: str | None = None,
        readonly: bool = False,
    ) -> Instance:
        """VMs: a disk (/dev/disk/by-id/virtio-VOLUME); containers: a mount at ``path``."""
        return await self._call(
            self.sync.attach_volume, name, volume, pool=pool, path=path, readonly=readonly
        )

    async def detach_volume(self, name: str, volume: str, *, pool: str = "default") -> Instance:
        return await self._call(self.sync.detach_volume, name, volume, pool=pool)

    async def list_snapshots(self, name: str) -> list[SnapshotInfo]:
        return await self._call(self.sync.list_snapshots, name)

    async def get_snapshot(self, name: str, snapshot: str) -> SnapshotInfo:
        return await self._call(self.sync.get_snapshot, name, snapshot)

    async def create_snapshot(
        self, name: str, snapshot: str | None = None, *, stateful: bool = False
    ) -> SnapshotInfo:
        return await self._call(self.sync.create_snapshot, name, snapshot, stateful=stateful)

    async def restore_snapshot(self, name: str, snapshot: str) -> Instance:
        return await self._call(self.sync.restore_snapshot, name, snapshot)

    async def delete_snapshot(self, name: str, snapshot: str) -> None:
        return await self._call(self.sync.delete_snapshot, name, snapshot)

    async def copy_instance(self, name: str, new_name: str) -> Instance:
        """A stopped copy-on-write copy of ``name`` (its disk is shared until written)."""
        return await self._call(self.sync.copy_instance, name, new_name)

    async def list_networks(self) -> list[NetworkConfig]:
        return await self._call(self.sync.list_networks)

    async def get_network(self, name: str) -> NetworkConfig:
        return await self._call(self.sync.get_network, name)

    async def create_network(self, config: NetworkConfig | Mapping[str, Any]) -> NetworkConfig:
        return await self._call(self.sync.create_network, config)

    async def update_network(self, name: str, **changes: Any) -> NetworkConfig:
        return await self._call(self.sync.update_network, name, **changes)

    async def delete_network(self, name: str) -> None:
        return await self._call(self.sync.delete_network, name)

    async def attach_network(
        self, name: str, network: str, *, ip: str | None = None, mac: str | None = None
    ) -> Instance:
        """Give an instance an interface on ``network`` (live for running containers)."""
        return await self._call(self.sync.attach_network, name, network, ip=ip, mac=mac)

    async def detach_network(self, name: str, network: str) -> Instance:
        return await self._call(self.sync.detach_network, name, network)

    async def add_port(self, name: str, host_port: int, port: int, proto: str = "tcp") -> Instance:
        return await self._call(self.sync.add_port, name, host_port, port, proto)

    async def remove_port(self, name: str, host_port: int, proto: str = "tcp") -> Instance:
        return await self._call(self.sync.remove_port, name, host_port, proto)

    async def set_firewall(self, name: str, rules: Sequence[Mapping[str, Any]] | None) -> Instance:
        """Replace the ingress allow-list; None lets everything in, [] lets nothing in."""
        return await self._call(self.sync.set_firewall, name, rules)

    async def add_firewall_rule(
        self,
        name: str,
        *,
        source: str = "0.0.0.0/0",
        proto: str | None = None,
        port: int | None = None,
    ) -> Instance:
        return await self._call(
            self.sync.add_firewall_rule, name, source=source, proto=proto, port=port
        )

    async def remove_firewall_rule(self, name: str, index: int) -> Instance:
        return await self._call(self.sync.remove_firewall_rule, name, index)

    async def server_config(self) -> ListenerInfo:
        """The TLS listener: where it listens, its addresses, the CA's fingerprint."""
        return await self._call(self.sync.server_config)

    async def set_listen(self, address: str | None) -> ListenerInfo:
        """Serve the API over TLS on ``address`` (``HOST:PORT``, ``:PORT``); None: stop."""
        return await self._call(self.sync.set_listen, address)

    async def list_trust(self) -> list[TrustEntry]:
        return await self._call(self.sync.list_trust)

    async def add_trust(
        self, name: str, type: str = "certificate", expires_in: int | None = None
    ) -> TrustCreated:
        """A join token (for `vz remote add`) or a bearer token; the secret is shown once."""
        return await self._call(self.sync.add_trust, name, type, expires_in)

    async def remove_trust(self, name: str) -> None:
        """Revoke at once: the next request with that certificate or token is refused."""
        return await self._call(self.sync.remove_trust, name)


class AsyncEphemeralInstance:
    """A running instance owned by :meth:`AsyncClient.run`; deleted when the block ends."""

    def __init__(self, client: AsyncClient, instance: Instance) -> None:
        self.client = client
        self.instance = instance

    @property
    def name(self) -> str:
        return self.instance.name

    async def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        return await self.client.exec(self.name, argv, **kwargs)

    async def exec_capture(
        self, argv: Sequence[str], **kwargs: Any
    ) -> tuple[ExecResult, bytes, bytes]:
        return await self.client.exec_capture(self.name, argv, **kwargs)
