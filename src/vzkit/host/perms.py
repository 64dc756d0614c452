"""Who may open vzkit's files on the host: directory modes that keep local users out.

vzd runs as root and its state holds guest data (VM disks, memory states, containers'
files, volumes) and secrets (the database, the CA's key). Local users get nothing of it:
the roots let users pass (QEMU's user, a container's root) but not list, and every
directory below is closed to others, so a file's own mode never matters for them (a
setuid binary a container planted is out of reach, whatever its owner). QEMU runs as
``vz-qemu`` and reads what it needs through that user's group.

=============================================  =========================================
state and runtime roots, both ``instances/``   0711 root
a VM's instance directory                      0750 root:vz-qemu (no setgid bit: an
                                               export carries its directories' modes, and
                                               import refuses setgid ones)
a container's instance directory               0700 root
a container's runtime directory (its rootfs)   0700, owned by its root (vz-runtime enters
                                               it as that user; engines/container)
``images/``, ``images/blobs/``                 0750 root:vz-qemu, blobs 0440 root:vz-qemu
``images/rootfs/`` (containers' image trees)   0700 root
a storage pool and its ``volumes/``            0700 root, block volumes 0600 root (QEMU
                                               gets the volumes it uses as descriptors
                                               vzd opened, never by path)
everything else (database, logs, pki, ...)     others: no access
=============================================  =========================================

:func:`tighten` brings an existing installation to these modes on daemon start. It only
changes what vzd made: never the files inside a container's layers or a filesystem volume,
which belong to the container.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

from vzkit.settings import Settings

PASS_THROUGH = 0o711
PRIVATE = 0o700
VM_DIR = 0o750
SHARED_DIR = 0o750
BLOB = 0o440
DISK = 0o640


@functools.cache
def _qemu_gid(user: str) -> int | None:
    if not user:
        return None
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        return None


def qemu_gid(settings: Settings) -> int | None:
    """The group QEMU's user reads vzkit's files through (None: QEMU runs as vzd's user,
    as it does when vzd is not root and could not switch it)."""
    return _qemu_gid(settings.qemu_user) if os.geteuid() == 0 else None


def make_dir(path: Path, mode: int, group: int | None = None, owner: int = -1) -> Path:
    """``mkdir -p`` whose last directory gets ``mode`` (and ``group``, when given),
    whether it was new or not (it is private until then)."""
    path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
    if group is not None or owner != -1:
        os.chown(path, owner, -1 if group is None else group)
    os.chmod(path, mode)
    return path


def vm_dir(path: Path, group: int | None) -> Path:
    """A VM's instance directory: QEMU's group reads it (root only without that user)."""
    return make_dir(path, VM_DIR if group is not None else PRIVATE, group)


def share_file(path: Path, group: int | None, mode: int) -> None:
    """A file QEMU reads through its group (``mode`` without the group bits if none)."""
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, mode if group is not None else mode & ~0o070)


def _no_others(path: str, group: int | None = None) -> None:
    """Take others' bits away (and hand the file to ``group``, for QEMU to read)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    if group is not None and st.st_gid != group:
        os.lchown(path, -1, group)
    if st.st_mode & 0o007 or (group is not None and st.st_mode & 0o6000):
        # chown cleared the setuid/setgid bits of a file: put back what others may not use.
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o007)


def _files_in(directory: Path) -> Iterable[str]:
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                yield entry.path


def tighten(
    settings: Settings,
    vms: Iterable[str],
    containers: Iterable[str],
    pools: Iterable[Path],
) -> None:
    """Bring vzd's directories to the modes above (blocking; idempotent, cheap when done).

    ``vms`` and ``containers``: instance uuids; ``pools``: storage pool directories."""
    group = qemu_gid(settings)
    for root in (settings.state_dir, settings.runtime_dir):
        make_dir(root, PASS_THROUGH)
    for d in (settings.instances_dir, settings.instance_runtime_dir):
        make_dir(d, PASS_THROUGH)
    for path in _files_in(settings.state_dir):
        _no_others(path)
    for name in ("networks", "nft", "pki"):
        if (settings.state_dir / name).is_dir():
            _tree_no_others(settings.state_dir / name)
    _tighten_images(settings.images_dir, group)
    for uuid in vms:
        sdir = settings.instances_dir / uuid
        if sdir.is_dir():
            vm_dir(sdir, group)
            _tree_no_others(sdir, group)
    for uuid in containers:
        sdir = settings.instances_dir / uuid
        if sdir.is_dir():
            make_dir(sdir, PRIVATE)
            for path in _files_in(sdir):
                _no_others(path)
    storage = settings.state_dir / "storage"
    if storage.is_dir():
        make_dir(storage, PRIVATE)
    for pool in pools:
        if pool.is_dir():
            secure_pool(pool)
            for path in _files_in(pool / "volumes"):
                if path.endswith(".qcow2"):
                    # Older vzd handed volumes to QEMU's user and group: vzd's alone now.
                    os.lchown(path, os.geteuid(), os.getegid())
                    os.chmod(path, 0o600)


def secure_pool(pool: Path) -> None:
    """A pool and its volumes/ directory: vzd's alone (QEMU gets descriptors)."""
    make_dir(pool, PRIVATE)
    make_dir(pool / "volumes", PRIVATE)


def _tighten_images(images: Path, group: int | None) -> None:
    if not images.is_dir():
        return
    mode = SHARED_DIR if group is not None else PRIVATE
    make_dir(images, mode, group)
    for path in _files_in(images):
        _no_others(path)
    if (images / "blobs").is_dir():
        make_dir(images / "blobs", mode, group)
        for path in _files_in(images / "blobs"):
            share_file(Path(path), group, BLOB)
    if (images / "rootfs").is_dir():
        make_dir(images / "rootfs", PRIVATE)


def _tree_no_others(top: Path, group: int | None = None) -> None:
    """Every file and directory under ``top`` (vzd's own: no container layer)."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                if group is not None:
                    os.chown(path, -1, group)
                    os.chmod(path, VM_DIR)
                else:
                    _no_others(path)
        for name in filenames:
            _no_others(os.path.join(dirpath, name), group)
