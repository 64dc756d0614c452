"""A system container's own files, the overlay's upper layer: its engine state, snapshots
and copies of it, and what of it travels in an export (the one place the container engine
stages and adopts archive files).

A snapshot holds a copy of the upper layer (``cp -a``: owners, modes, xattrs and overlayfs
whiteouts kept; reflinked where the file system can), so it is self-contained: no layers
to merge or prune. The lower layer is the image's tree, shared and read-only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from vzkit.api.instances import ImageInfo, Instance
from vzkit.engines.base import Captured, EngineState
from vzkit.engines.common import ProcessEngine, check_archive_disks, link_tree, stage_snapshots
from vzkit.errors import EngineError, ImageError, ResourceExhausted
from vzkit.images.rootfs import container_rootfs

# The directories of a container's instance directory besides its upper layer.
WORK_DIRS = ("work", "rootfs", "bundle")


class ContainerState(EngineState):
    """The container engine's facts about an instance: its overlay's lower directory
    (the image's unpacked tree, shared by every container of that image version)."""

    lower: str


class ContainerFiles:
    """Disk snapshots and export/import for containers."""

    def __init__(self, engine: ProcessEngine) -> None:
        self._dir = engine.state_dir
        self.settings = engine.settings

    async def capture(self, inst: Instance, uuid: str, state: EngineState, dest: Path) -> Captured:
        """Copy the upper layer (a running container must be paused: a consistent copy)."""
        await copy_tree(self._dir(uuid) / "upper", dest / "upper")
        return Captured(state, size=_tree_size(dest / "upper"))

    async def restore(
        self, inst: Instance, uuid: str, state: EngineState, snapshot: Path, layer: str | None
    ) -> EngineState:
        sdir = self._dir(uuid)
        fresh = sdir / "upper.restoring"
        shutil.rmtree(fresh, ignore_errors=True)
        await copy_tree(snapshot / "upper", fresh)
        old = sdir / "upper.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(sdir / "upper", old)
        os.rename(fresh, sdir / "upper")
        shutil.rmtree(old, ignore_errors=True)
        # The work directory belongs to the old upper layer.
        shutil.rmtree(sdir / "work", ignore_errors=True)
        (sdir / "work").mkdir()
        return state

    async def clone(
        self, src_uuid: str, src_state: EngineState, layer: str | None, dst_uuid: str
    ) -> EngineState:
        dst = self._dir(dst_uuid)
        for d in WORK_DIRS:
            (dst / d).mkdir(parents=True, exist_ok=True)
        await copy_tree(self._dir(src_uuid) / "upper", dst / "upper")
        return ContainerState.of(src_state)

    # -- export and import -------------------------------------------------------------

    def stage(
        self, inst: Instance, uuid: str, state: EngineState, layers: list[str], dest: Path
    ) -> dict[str, str]:
        sdir = self._dir(uuid)
        if (sdir / "upper").is_dir():
            link_tree(sdir / "upper", dest / "upper")
        stage_snapshots(sdir, dest)
        return {}  # the lower directory is this host's: the importer finds its own

    def check_archive(self, files: Path, header: Mapping[str, object]) -> None:
        check_archive_disks(files, header)

    async def adopt(
        self,
        files: Path,
        header: Mapping[str, object],
        record: Instance,
        local: ImageInfo,
        archived: ImageInfo,
    ) -> EngineState:
        if local.digest != archived.digest:
            # A container's upper layer only makes sense over the same image files.
            raise ImageError(
                f"the archive's container was made from image {record.image!r} "
                f"{archived.digest[:19]}, this host has {local.digest[:19]}",
                hint="build the same image version here, or publish the container as an image",
            )
        lower = await asyncio.to_thread(container_rootfs, self.settings, local)
        for d in WORK_DIRS:
            (files / d).mkdir(exist_ok=True)
        (files / "upper").mkdir(exist_ok=True)
        return ContainerState(lower=str(lower))


def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


async def copy_tree(src: Path, dst: Path) -> None:
    """``cp -a``: keeps owners, modes, xattrs and overlayfs whiteouts; reflinks where the
    file system can (then a copy costs no data blocks)."""
    proc = await asyncio.create_subprocess_exec(
        "cp", "-a", "--reflink=auto", "--", str(src), str(dst),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        shutil.rmtree(dst, ignore_errors=True)
        why = err.decode(errors="replace").strip()
        if "No space left" in why:
            raise ResourceExhausted(f"copying {src} failed: {why}", hint="free disk space")
        raise EngineError(f"copying {src} failed: {why}")
