"""``vzd``: the daemon that owns every instance.

It serves the REST API on a unix socket (mode 0660, group ``vz`` when that group exists),
re-attaches to instances that kept running while it was away, and leaves them running
when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import grp
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn

from vzkit.api.instances import InstanceType
from vzkit.api.storage import PoolConfig
from vzkit.engines.base import Engine
from vzkit.engines.container.engine import ContainerEngine
from vzkit.engines.qemu.engine import QemuEngine
from vzkit.errors import VzError
from vzkit.host import cgroups, perms
from vzkit.host.probe import probe_host
from vzkit.images.store import ImageStore
from vzkit.server.app import create_app
from vzkit.server.core import build_services
from vzkit.server.db import Database
from vzkit.server.limits import guard_http, server_options
from vzkit.server.remote import RemoteAccess, tag_unix
from vzkit.settings import Settings

log = logging.getLogger("vzd")

HOUSEKEEPING_INTERVAL = 10.0
NETWORK_CHECK_INTERVAL = 1.0


def _bind(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a restrictive umask so the socket is never world-accessible, not even
    # between bind() and chmod().
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, -1, grp.getgrnam("vz").gr_gid)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def _lock(settings: Settings) -> int:
    perms.make_dir(settings.runtime_dir, perms.PASS_THROUGH)
    fd = os.open(settings.runtime_dir / "vzd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VzError(
            f"vzd is already running (lock {settings.runtime_dir / 'vzd.lock'} is held)",
            hint="check it with: vz daemon status",
        ) from None
    return fd


def _cgroups() -> cgroups.CgroupDriver | None:
    try:
        return cgroups.detect()
    except VzError as exc:
        log.warning("cgroups unavailable, instances run without limits: %s", exc.message)
        return None


async def serve(settings: Settings) -> None:
    lock_fd = _lock(settings)
    for d in (settings.state_dir, settings.instances_dir, settings.instance_runtime_dir):
        perms.make_dir(d, perms.PASS_THROUGH)
    # Before the database is opened: a state dir that already has one is from before
    # identities (settings.predates_identity), which the network's migration relies on.
    log.info("daemon identity %s (state dir %s)", settings.daemon_id, settings.state_dir)
    host = await asyncio.to_thread(probe_host, settings)
    log.info("host: %d cpus, accelerator %s (%s)", host.cpus, host.accel, host.accel_reason)
    db = Database(settings.db_path)
    await asyncio.to_thread(_tighten, settings, db)
    images = ImageStore(settings)
    driver = _cgroups()
    qemu = QemuEngine(settings, host, images, driver)
    containers = ContainerEngine(settings, images, driver)
    engines: dict[InstanceType, Engine] = {
        InstanceType.MICROVM: qemu,
        InstanceType.VM: qemu,
        InstanceType.CONTAINER: containers,
    }
    services = build_services(settings, db, host, images, engines, cgroups=driver)
    await services.reconcile()

    server: uvicorn.Server | None = None

    def shutdown() -> None:
        if server is not None:
            server.should_exit = True

    remote = RemoteAccess(db, settings.state_dir / "pki", settings.listen, settings)
    app = create_app(services, shutdown, remote)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        proxy_headers=False,  # the caller is who the kernel says (SO_PEERCRED), not a header
        **server_options(),
    )
    tag_unix(config)
    guard_http(config, settings)
    server = uvicorn.Server(config)
    sock = _bind(settings.socket_path)
    settings.pid_file.write_text(f"{os.getpid()}\n")

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            qemu.trim_console_logs()

    async def supervise_networks() -> None:
        # What vanishes from outside (a bridge, a TAP or veth, our nft tables, dnsmasq,
        # which is not our child: it outlives vzd) gives no event we could wait on, so it is
        # polled for: a healthy check is a link dump, a netlink message and a /proc read per
        # network (network/supervisor.py).
        while True:
            await asyncio.sleep(NETWORK_CHECK_INTERVAL)
            try:
                await services.networks.supervise()
            except Exception:
                log.exception("network supervision failed")

    await remote.start(app)
    keeper = asyncio.create_task(housekeeping())
    supervisor = asyncio.create_task(supervise_networks())
    try:
        await server.serve(sockets=[sock])
    finally:
        keeper.cancel()
        supervisor.cancel()
        await remote.stop()
        await services.close()
        db.close()
        with contextlib.suppress(FileNotFoundError):
            settings.socket_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            settings.pid_file.unlink()
        os.close(lock_fd)


def _tighten(settings: Settings, db: Database) -> None:
    """Bring an installation from before the modes of host/perms.py to them (cheap once
    done): only vzd's own directories and files, never a container's."""
    vms: list[str] = []
    containers: list[str] = []
    for inst in db.list():
        uuid = db.get(inst.name).uuid
        (containers if inst.type is InstanceType.CONTAINER else vms).append(uuid)
    pools = [PoolConfig.model_validate_json(data).path for _, data in db.pool_rows()]
    perms.tighten(settings, vms, containers, [p for p in pools if p is not None])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vzd", description="the vzkit daemon")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve the API over TLS there too (default: $VZ_LISTEN, or what "
        "`vz daemon listen` stored)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings()
        if args.listen:
            settings = dataclasses.replace(settings, listen=args.listen)
        asyncio.run(serve(settings))
    except VzError as exc:
        print(f"vzd: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"vzd: hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
