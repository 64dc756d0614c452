"""What of a VM travels in an export archive, and how an archive's disks are checked and
adopted on import: the one place the QEMU engine stages and validates archive files.

An export holds the whole qcow2 chain of the disk's (frozen) top and of every snapshot's
layer, the image's disk included, so the target host needs nothing else.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from vzkit.api.instances import ImageInfo, Instance
from vzkit.engines.base import EngineState
from vzkit.engines.common import check_archive_disks, stage_snapshots
from vzkit.engines.qemu import disks
from vzkit.engines.qemu.disks import QemuState
from vzkit.host import perms, safefs

if TYPE_CHECKING:
    from vzkit.engines.qemu.engine import QemuEngine


class QemuExport:
    def __init__(self, engine: QemuEngine) -> None:
        self.engine = engine

    def stage(
        self, inst: Instance, uuid: str, state: EngineState, layers: list[str], dest: Path
    ) -> dict[str, str]:
        st = QemuState.of(state)
        sdir = self.engine.state_dir(uuid)
        names: set[str] = set()
        for top in [st.disk, *layers]:
            if safefs.exists(sdir, top):
                names.update(disks.chain(sdir, top))
        with safefs.dir_fd(sdir) as src, safefs.dir_fd(dest) as dst:
            for name in names:
                # The chain's own files, never a link's target.
                os.link(name, name, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
        stage_snapshots(sdir, dest)
        return {"top": st.top} if st.top else {}

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
        """The exported top is frozen: the instance writes to a new one over it."""
        perms.vm_dir(files, perms.qemu_gid(self.engine.settings))
        top = header.get("top")
        if not isinstance(top, str):
            return QemuState()
        return QemuState(top=await disks.freeze_offline(files, top))


def _layout(name: str, kind: int) -> bool:
    """A VM's archived files: its disk layers and the snapshots' directory."""
    return (kind == stat.S_IFREG and name.endswith(".qcow2")) or (
        kind == stat.S_IFDIR and name == "snapshots"
    )
