"""A system container's own files, the overlay's upper layer: its engine state, snapshots
and copies of it, and what of it travels in an export (the one place the container engine
stages and adopts archive files).

A snapshot holds a copy of the upper layer (``cp -a``: owners, modes, xattrs and overlayfs
whiteouts kept; reflinked where the file system can), so it is self-contained: no layers
to merge or prune. The lower layer is the image's tree, shared and read-only.

An unprivileged container's files are owned by the host ids of its map (idmap.py), the
same for every such container, so copies and restores keep working owners as ``cp -a``
keeps them; an archive records its map, and an import onto a host whose map differs
re-owns the files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from vzkit.api.instances import ImageInfo, Instance
from vzkit.engines.base import Captured, EngineState
from vzkit.engines.common import ProcessEngine, check_archive_disks, link_tree, stage_snapshots
from vzkit.engines.container.idmap import IdMap, shift_owners
from vzkit.errors import EngineError, ImageError, InvalidConfig, ResourceExhausted
from vzkit.host import safefs
from vzkit.images.rootfs import container_rootfs

# The directories of a container's instance directory besides its upper layer (its root
# is mounted in its run directory; an empty "rootfs" of older versions is left alone).
WORK_DIRS = ("work", "bundle")


class ContainerState(EngineState):
    """The container engine's facts about an instance: its overlay's lower directory
    (the image's unpacked tree, shared by every container of that image version) and the
    id map its files were written with (None: privileged, host ids; so are records from
    before user namespaces)."""

    lower: str
    idmap: IdMap | None = None


class ContainerFiles:
    """Disk snapshots and export/import for containers."""

    def __init__(
        self,
        engine: ProcessEngine,
        make_dirs: Callable[[Path, ContainerState], None],
        host_idmap: Callable[[], IdMap],
    ) -> None:
        self._dir = engine.state_dir
        self.settings = engine.settings
        self._make_dirs = make_dirs
        self._host_idmap = host_idmap

    async def capture(self, inst: Instance, uuid: str, state: EngineState, dest: Path) -> Captured:
        """Copy the upper layer (a running container must be paused: a consistent copy)."""
        await copy_tree(self._dir(uuid) / "upper", dest / "upper")
        return Captured(state, size=safefs.tree_size(dest / "upper", allocated=True))

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
        self._make_dirs(sdir, ContainerState.of(state))
        return state

    async def clone(
        self, src_uuid: str, src_state: EngineState, layer: str | None, dst_uuid: str
    ) -> EngineState:
        dst = self._dir(dst_uuid)
        state = ContainerState.of(src_state)
        dst.mkdir(mode=0o700, parents=True)
        await copy_tree(self._dir(src_uuid) / "upper", dst / "upper")
        self._make_dirs(dst, state)
        return state

    # -- export and import -------------------------------------------------------------

    def stage(
        self, inst: Instance, uuid: str, state: EngineState, layers: list[str], dest: Path
    ) -> dict[str, str]:
        sdir = self._dir(uuid)
        if safefs.exists(sdir, "upper", stat.S_IFDIR):
            link_tree(sdir / "upper", dest / "upper")
        stage_snapshots(sdir, dest)
        # The lower directory is this host's: the importer finds its own.
        idmap = ContainerState.of(state).idmap
        return {"idmap": idmap.text()} if idmap is not None else {}

    def check_archive(self, files: Path, header: Mapping[str, object]) -> None:
        check_archive_disks(files, header, _layout)

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
        archived_map = _archived_idmap(header)
        idmap = None if record.security.privileged else self._host_idmap()
        state = ContainerState(lower=str(lower), idmap=idmap)
        (files / "upper").mkdir(exist_ok=True)
        await asyncio.to_thread(_reown, files, archived_map, idmap)
        await asyncio.to_thread(self._make_dirs, files, state)
        return state


def _archived_idmap(header: Mapping[str, object]) -> IdMap | None:
    text = header.get("idmap")
    if text is None:
        return None  # privileged, or from before user namespaces (record says privileged)
    try:
        return IdMap.parse(str(text))
    except (ValueError, TypeError) as exc:
        raise InvalidConfig(f"the archive's id map {text!r} is not UID:GID:SIZE") from exc


def _reown(files: Path, old: IdMap | None, new: IdMap | None) -> None:
    """The upper layer and the snapshots' copies of it, owned for this host's map."""
    shift_owners(files / "upper", old, new)
    snapshots = files / "snapshots"
    if snapshots.is_dir():
        for snap in snapshots.iterdir():
            if (snap / "upper").is_dir() and not (snap / "upper").is_symlink():
                shift_owners(snap / "upper", old, new)


def _layout(name: str, kind: int) -> bool:
    """A container's archived files: its upper layer and the snapshots' directory."""
    return kind == stat.S_IFDIR and name in ("upper", "snapshots")


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
