"""The daemon's pools and volumes: database records backed by a pool driver.

The pool ``default`` (a ``dir`` pool under the state directory) is made on first use.
Which instance has which volume is recorded on the instance (``Instance.volumes``); this
module answers "who uses it" from there, so a volume in use is never deleted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from vzkit.api.instances import Instance, InstanceType
from vzkit.api.storage import (
    Content,
    PoolConfig,
    PoolInfo,
    VolumeAttachment,
    VolumeConfig,
    VolumeInfo,
)
from vzkit.errors import Conflict, InvalidConfig, NotFound
from vzkit.host import perms
from vzkit.server.db import Database
from vzkit.settings import Settings
from vzkit.storage.pool import DirPool, PoolDriver

DEFAULT_POOL = "default"


@dataclass(frozen=True)
class VolumeMount:
    """What an engine needs to give an instance a volume."""

    name: str
    pool: str
    host_path: Path
    content: Content
    target: str | None  # containers: the mount point
    readonly: bool

    @property
    def device_id(self) -> str:
        # QEMU ids: letters, digits, '-', '_', '.'; the pool keeps same-named volumes apart.
        return f"vol-{self.pool}-{self.name}"


class StorageManager:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    # -- pools ---------------------------------------------------------------------------

    def pools(self) -> list[PoolConfig]:
        found = [PoolConfig.model_validate_json(d) for _, d in self.db.pool_rows()]
        if not any(p.name == DEFAULT_POOL for p in found):
            found.insert(0, self._default())
        return found

    def _default(self) -> PoolConfig:
        pool = PoolConfig(name=DEFAULT_POOL, path=self.settings.state_dir / "storage" / "default")
        self.db.put_pool(pool.name, pool.model_dump_json())
        self.driver(pool).setup()
        return pool

    def pool(self, name: str) -> PoolConfig:
        for pool in self.pools():
            if pool.name == name:
                return pool
        raise NotFound(f"storage pool {name!r} not found", hint="list pools: vz storage list")

    def driver(self, pool: PoolConfig) -> PoolDriver:
        assert pool.path is not None
        return DirPool(pool.path, perms.qemu_gid(self.settings))

    def pool_info(self, name: str) -> PoolInfo:
        pool = self.pool(name)
        total, used, free = self.driver(pool).usage()
        return PoolInfo(**pool.model_dump(), total=total, used=used, free=free)

    def create_pool(self, config: PoolConfig) -> PoolConfig:
        if any(p.name == config.name for p in self.pools()):
            raise Conflict(
                f"a storage pool named {config.name!r} already exists",
                hint="choose another name",
            )
        pool = config
        if pool.path is None:
            pool = config.model_copy(
                update={"path": self.settings.state_dir / "storage" / config.name}
            )
        assert pool.path is not None
        if any(p.path == pool.path for p in self.pools()):
            raise Conflict(f"pool path {pool.path} is already used by another pool")
        try:
            if pool.path.exists() and any(pool.path.iterdir()) and config.path is not None:
                raise InvalidConfig(
                    f"pool path {pool.path} is not empty",
                    hint="give an empty or new directory: vzkit owns what is in a pool",
                )
            self.driver(pool).setup()
        except OSError as exc:
            raise InvalidConfig(
                f"cannot use {pool.path} as a pool directory: {exc.strerror or exc}",
                hint="give a directory path that vzd can create or write to",
            ) from exc
        self.db.put_pool(pool.name, pool.model_dump_json())
        return pool

    def delete_pool(self, name: str) -> None:
        pool = self.pool(name)
        if name == DEFAULT_POOL:
            raise InvalidConfig("the default pool cannot be deleted")
        if self.db.volume_rows(name):
            raise Conflict(
                f"storage pool {name!r} still has volumes",
                hint=f"delete them first (vz volume list --pool {name})",
            )
        self.db.delete_pool(name)
        assert pool.path is not None
        # Only what the driver made; a user's own files in the directory stay.
        for sub in ("volumes",):
            with contextlib.suppress(OSError):
                (pool.path / sub).rmdir()
        with contextlib.suppress(OSError):
            pool.path.rmdir()

    # -- volumes ---------------------------------------------------------------------------

    def volumes(self, pool: str | None = None) -> list[VolumeInfo]:
        users = self._users()
        return [
            self._info(VolumeConfig.model_validate_json(d), users)
            for d in self.db.volume_rows(pool)
        ]

    def volume(self, name: str, pool: str = DEFAULT_POOL) -> VolumeInfo:
        config = self._config(name, pool)
        return self._info(config, self._users())

    def _config(self, name: str, pool: str) -> VolumeConfig:
        for data in self.db.volume_rows(pool):
            config = VolumeConfig.model_validate_json(data)
            if config.name == name:
                return config
        self.pool(pool)  # an unknown pool says so
        raise NotFound(
            f"volume {name!r} not found in pool {pool!r}", hint="list volumes: vz volume list"
        )

    def _users(self) -> dict[tuple[str, str], list[str]]:
        users: dict[tuple[str, str], list[str]] = {}
        for inst in self.db.list():
            for att in inst.volumes:
                users.setdefault((att.pool, att.volume), []).append(inst.name)
        return users

    def _info(self, config: VolumeConfig, users: dict[tuple[str, str], list[str]]) -> VolumeInfo:
        driver = self.driver(self.pool(config.pool))
        return VolumeInfo(
            **config.model_dump(),
            path=str(driver.volume_path(config.name, config.content)),
            used=driver.used_bytes(config.name, config.content),
            attached_to=users.get((config.pool, config.name), []),
        )

    def create_volume(self, config: VolumeConfig) -> VolumeInfo:
        pool = self.pool(config.pool)
        with contextlib.suppress(NotFound):
            self._config(config.name, config.pool)
            raise Conflict(
                f"volume {config.name!r} already exists in pool {config.pool!r}",
                hint="choose another name",
            )
        self.driver(pool).create_volume(config.name, config.size, config.content)
        self.db.put_volume(config.pool, config.name, config.model_dump_json())
        return self.volume(config.name, config.pool)

    def resize_volume(self, name: str, pool: str, size: int) -> VolumeInfo:
        config = self._config(name, pool)
        if size < config.size:
            raise InvalidConfig(
                f"volume {name!r} is {config.size} bytes; volumes only grow",
                hint="give a size larger than the current one",
            )
        self.driver(self.pool(pool)).resize_volume(name, size)
        self.db.put_volume(pool, name, config.model_copy(update={"size": size}).model_dump_json())
        return self.volume(name, pool)

    def record_size(self, name: str, pool: str, size: int) -> None:
        """After a live resize (QMP block_resize) the file already has the new size."""
        config = self._config(name, pool)
        self.db.put_volume(pool, name, config.model_copy(update={"size": size}).model_dump_json())

    def delete_volume(self, name: str, pool: str) -> None:
        config = self._config(name, pool)
        users = self._users().get((pool, name), [])
        if users:
            raise Conflict(
                f"volume {name!r} is attached to {', '.join(users)}",
                hint=f"detach it first: vz volume detach {users[0]} {name}",
            )
        self.driver(self.pool(pool)).delete_volume(name, config.content)
        self.db.delete_volume(pool, name)

    def mount(self, inst: Instance, att: VolumeAttachment) -> VolumeMount:
        """Check that ``att`` suits ``inst`` and say where the volume is on the host."""
        config = self._config(att.volume, att.pool)
        container = inst.type is InstanceType.CONTAINER
        if container and config.content != "filesystem":
            raise InvalidConfig(
                f"volume {att.volume!r} is a block device; containers take filesystem volumes",
                hint=f"vz volume create NAME --content filesystem, then attach that to {inst.name}",
            )
        if not container and config.content != "block":
            raise InvalidConfig(
                f"volume {att.volume!r} is a filesystem volume; VMs take block volumes",
                hint="vz volume create NAME --size 1GiB (a qcow2 disk)",
            )
        if container and att.path is None:
            raise InvalidConfig("a container's volume needs a mount path", hint="e.g. --path /data")
        driver = self.driver(self.pool(att.pool))
        return VolumeMount(
            name=att.volume,
            pool=att.pool,
            host_path=driver.volume_path(att.volume, config.content),
            content=config.content,
            target=att.path,
            readonly=att.readonly,
        )
