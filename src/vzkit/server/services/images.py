"""Images: the store's builds (one at a time per image) and deletions, and the container
trees unpacked from them, removed once no image or instance uses their version."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from vzkit.api.instances import ImageInfo
from vzkit.errors import Conflict, NotFound
from vzkit.images.rootfs import prune_rootfs
from vzkit.images.store import ImageStore
from vzkit.server.services.guard import InstanceGuard
from vzkit.settings import Settings

Progress = Callable[[str, float | None], None]


class ImageService:
    def __init__(self, settings: Settings, store: ImageStore, guard: InstanceGuard) -> None:
        self.settings = settings
        self.store = store
        self.guard = guard
        self._locks: dict[str, asyncio.Lock] = {}

    def list(self) -> list[ImageInfo]:
        return self.store.list()

    def get(self, name: str) -> ImageInfo:
        return self.store.get(name)

    def known(self, name: str) -> bool:
        """Whether ``name`` is an image this daemon can build."""
        return name in self.store.known_names()

    async def ensure(self, name: str, progress: Progress | None = None) -> ImageInfo:
        with contextlib.suppress(NotFound):
            return self.store.get(name)
        if name not in self.store.known_names():
            raise NotFound(
                f"unknown image {name!r}",
                hint="available images: " + ", ".join(sorted(self.store.known_names())),
            )
        return await self.build(name, progress or (lambda s, f: None))

    async def build(self, name: str, progress: Progress, force: bool = False) -> ImageInfo:
        async with self._locks.setdefault(name, asyncio.Lock()):
            info = await asyncio.to_thread(self.store.build, name, progress, force)
        await self.prune_rootfs()
        return info

    async def delete(self, name: str) -> None:
        users = [i.name for i in self.guard.instances() if i.image == name]
        if users:
            raise Conflict(
                f"image {name!r} is used by {len(users)} instance(s): {', '.join(users)}",
                hint="delete those instances first: vz delete " + " ".join(users),
            )
        self.store.delete(name)
        await self.prune_rootfs()

    def check_new_name(self, name: str) -> None:
        self.store.check_new_name(name)

    async def publish(self, name: str, base: ImageInfo, rootfs: Path, origin: str) -> ImageInfo:
        """Store a flattened disk as the new image ``name`` (made from ``base``)."""
        return await asyncio.to_thread(self.store.publish, name, base, rootfs, origin)

    def scratch(self, suffix: str) -> Path:
        """A temporary file's path beside the images (same file system as the blobs)."""
        return self.settings.images_dir / f".tmp-publish-{suffix}"

    async def prune_rootfs(self) -> None:
        """Drop container trees of image versions that nothing uses any more."""
        keep = {i.digest for i in self.store.list()} | {
            i.image_digest for i in self.guard.instances()
        }
        await asyncio.to_thread(prune_rootfs, self.settings, keep)
