"""A VM's root disk as a chain of qcow2 layers in its instance directory.

``base.qcow2`` (a hard link to the image's disk) <- ``root.qcow2`` <- ``disk-<id>.qcow2`` ...
Backing names are relative, so every chain lives in one directory. Only the top is ever
written; freezing it (for a snapshot or a copy) means putting a new empty top over it:
offline with qemu-img, live with QMP ``blockdev-add`` + ``blockdev-snapshot`` (the VM
switches to the new top in one step, paused around it). Frozen layers never change, so a
copy of the instance hard-links them into its own directory and needs no reference
counting: each directory holds every file its chains need.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vzkit.engines.base import EngineState
from vzkit.errors import EngineError, StateError
from vzkit.host import safefs
from vzkit.storage import qcow2

ROOT_TOP = "root.qcow2"


class QemuState(EngineState):
    """The QEMU engine's facts about an instance: its disk's writable top layer.

    ``top`` is unset until the first layer is frozen over ``root.qcow2`` (and for a
    micro-VM booted from its initramfs, which has no disk at all).
    """

    top: str | None = None

    @property
    def disk(self) -> str:
        """The file name of the disk's top in the instance directory."""
        return self.top or ROOT_TOP


def _new_name() -> str:
    return f"disk-{secrets.token_hex(6)}.qcow2"


def chain(directory: Path, name: str) -> list[str]:
    """File names of ``name``'s backing chain in ``directory``, ``name`` first."""
    infos = qcow2.info(directory / name, chain=True)
    return [Path(i["filename"]).name for i in infos]


async def freeze_offline(directory: Path, top: str) -> str:
    """Put a new empty top over ``top``; returns the new top's name."""
    new = _new_name()
    await asyncio.to_thread(qcow2.create, directory / new, backing=Path(top))
    return new


async def freeze_live(
    qmp: Any, directory: Path, top: str, owner: tuple[int, int] | None = None
) -> str:
    """The same for a running QEMU: the guest's disk switches to the new top at once.
    ``owner``: the user QEMU runs as, who must be able to write the new top."""
    new = _new_name()
    await asyncio.to_thread(qcow2.create, directory / new, backing=Path(top))
    if owner is not None:
        os.chown(directory / new, *owner, follow_symlinks=False)
    try:
        node = await active_node(qmp)
        new_node = "n" + new.removeprefix("disk-").removesuffix(".qcow2")
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": new_node,
                "file": {"driver": "file", "filename": str(directory / new)},
                # The old top becomes the backing file through blockdev-snapshot itself.
                "backing": None,
            },
        )
        await qmp.execute("blockdev-snapshot", {"node": node, "overlay": new_node})
    except BaseException as exc:
        (directory / new).unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise EngineError(f"switching the disk to a new layer failed: {exc}") from exc
        raise
    return new


async def active_node(qmp: Any) -> str:
    """The node name of the (single) disk's active layer."""
    for dev in await qmp.execute("query-block"):
        inserted = dev.get("inserted")
        if inserted and inserted.get("node-name"):
            return str(inserted["node-name"])
    raise EngineError("the VM has no disk")


async def new_top_over(directory: Path, layer: str) -> str:
    """A fresh top over a frozen layer (restoring a snapshot)."""
    if not safefs.exists(directory, layer):
        raise EngineError(f"disk layer {layer} is missing from {directory}")
    return await freeze_offline(directory, layer)


def link_chain(src: Path, dst: Path, names: Iterable[str]) -> None:
    """Hard-link frozen layers into another instance's directory (a copy's chain)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = dst / name
        if not os.path.lexists(target):
            os.link(src / name, target, follow_symlinks=False)


def prune(directory: Path, keep_tops: Iterable[str]) -> list[str]:
    """Remove the layers no chain from ``keep_tops`` needs; returns their names."""
    needed: set[str] = set()
    for top in keep_tops:
        if safefs.exists(directory, top):
            needed.update(chain(directory, top))
    gone = []
    for path in directory.glob("*.qcow2"):
        if path.name not in needed and path.name != "base.qcow2":
            path.unlink()
            gone.append(path.name)
    return gone


def merge_out(directory: Path, layer: str, running_top: str | None) -> None:
    """Make ``layer`` unneeded: its children take in its data and skip it.

    A child is rebased onto ``layer``'s own backing file with a safe (copying) rebase, which
    keeps every child's content identical. A child the running VM has open, or one shared
    with a copy (hard-linked elsewhere), cannot be rewritten: that is refused.
    """
    parent = qcow2.backing_file(directory / layer)
    children = []
    for path in directory.glob("*.qcow2"):
        if path.name != layer and qcow2.backing_file(path) == layer:
            children.append(path)
    for child in children:
        if child.name == running_top:
            raise StateError(
                "the snapshot's disk layer is the base of the running disk",
                hint="stop the instance, then delete the snapshot (its data is merged)",
            )
        if child.lstat().st_nlink > 1:
            raise StateError(
                "the snapshot's disk layer is shared with a copy of this instance",
                hint="delete the copy first, or keep the snapshot",
            )
    for child in children:
        qcow2.rebase(child, None if parent is None else Path(parent))
