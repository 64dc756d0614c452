"""Storage: pools of volumes (qcow2 disks for VMs, directories for containers) and the
qemu-img operations behind them (snapshots, overlays, copies).

``qcow2`` wraps qemu-img; ``pool`` has the driver protocol and the ``dir`` driver;
``models`` the strict resource models the API, CLI and SDK share.
"""

from __future__ import annotations

from vzkit.api.storage import Content, PoolConfig, PoolInfo, VolumeConfig, VolumeInfo
from vzkit.storage.pool import DirPool, PoolDriver

__all__ = [
    "Content",
    "DirPool",
    "PoolConfig",
    "PoolDriver",
    "PoolInfo",
    "VolumeConfig",
    "VolumeInfo",
]
