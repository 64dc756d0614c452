"""Storage pools: the driver protocol and the ``dir`` driver.

A driver knows nothing of the database, of attachments or of pool names: the daemon
records volumes, refuses to delete attached ones and turns a driver's paths into devices.
Volume names share one namespace per pool whatever their content, and follow the
instance name rule, which also keeps them free of '/' and '.' (so ``<name>.tmp`` can
never be a volume).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vzkit.api.bounds import NAME_RE, NAME_RULE
from vzkit.api.storage import Content
from vzkit.errors import (
    Conflict,
    EngineError,
    HostUnsupported,
    InvalidConfig,
    NotFound,
    ResourceExhausted,
)
from vzkit.host import perms
from vzkit.storage import qcow2

__all__ = ["DirPool", "PoolDriver"]

_LIST_HINT = "list volumes: vz volume list"


class PoolDriver(Protocol):
    """What the daemon needs from a storage backend (dir today; btrfs or lvm later)."""

    def setup(self) -> None:
        """Make the pool's storage ready and drop leftovers of interrupted operations."""

    def volumes(self) -> dict[str, Content]:
        """The volumes that exist, for reconciling the database with reality."""
        ...

    def volume_path(self, name: str, content: Content) -> Path:
        """Where the volume is (or would be); does not check that it exists."""
        ...

    def create_volume(self, name: str, size: int, content: Content) -> Path: ...

    def delete_volume(self, name: str, content: Content) -> None: ...

    def resize_volume(self, name: str, size: int) -> None: ...

    def clone_volume(
        self,
        src: str,
        dst: str,
        content: Content,
        *,
        progress: Callable[[float], None] | None = None,
    ) -> Path: ...

    def usage(self) -> tuple[int, int, int]:
        """(total, used, free) bytes of the storage under the pool."""
        ...

    def used_bytes(self, name: str, content: Content) -> int:
        """Bytes the volume really occupies on the host."""
        ...


def _check_name(name: str) -> None:
    # Names become file names: the rule is what keeps "../x" out of the pool.
    if not NAME_RE.match(name):
        raise InvalidConfig(f"invalid volume name {name!r}: {NAME_RULE}")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class DirPool:
    """Volumes as plain files in a directory: ``volumes/<name>.qcow2`` for block volumes,
    ``volumes/<name>/`` for filesystem volumes.

    A filesystem volume's size is not enforced (a plain directory has no quota): the
    daemon keeps it as the volume's config and can compare :meth:`used_bytes` with it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.volumes_dir = path / "volumes"

    def setup(self) -> None:
        perms.secure_pool(self.path)
        # Only at start-up: a ".tmp" is a copy or a delete that a crash interrupted.
        for entry in self.volumes_dir.glob("*.tmp"):
            _remove(entry)

    def volumes(self) -> dict[str, Content]:
        found: dict[str, Content] = {}
        if not self.volumes_dir.is_dir():
            return found
        for entry in self.volumes_dir.iterdir():
            if entry.suffix == ".qcow2" and entry.is_file() and NAME_RE.match(entry.stem):
                found[entry.stem] = "block"
            elif entry.is_dir() and NAME_RE.match(entry.name):
                found[entry.name] = "filesystem"
        return found

    def volume_path(self, name: str, content: Content) -> Path:
        _check_name(name)
        if content == "block":
            return self.volumes_dir / f"{name}.qcow2"
        return self.volumes_dir / name

    def create_volume(self, name: str, size: int, content: Content) -> Path:
        self._free(name)
        if not self.volumes_dir.is_dir():
            perms.secure_pool(self.path)
        path = self.volume_path(name, content)
        if content == "block":
            qcow2.create(path, size)
            os.chmod(path, 0o600)
        else:
            try:
                path.mkdir()
            except FileExistsError as exc:
                raise self._taken(name) from exc
        return path

    def delete_volume(self, name: str, content: Content) -> None:
        path = self._existing(name, content)
        if content == "block":
            path.unlink()
            return
        # Renamed first so the name is gone at once; a crash mid-way leaves only a .tmp
        # that setup() removes.
        doomed = _tmp(path)
        _remove(doomed)
        path.rename(doomed)
        shutil.rmtree(doomed)

    def resize_volume(self, name: str, size: int) -> None:
        if (path := self.volume_path(name, "block")).is_file():
            qcow2.resize(path, size)
        elif not self.volume_path(name, "filesystem").is_dir():
            raise self._missing(name)
        # A filesystem volume's size is advisory in a dir pool: nothing on disk changes.

    def clone_volume(
        self,
        src: str,
        dst: str,
        content: Content,
        *,
        progress: Callable[[float], None] | None = None,
    ) -> Path:
        """Copy a volume into a new, independent one.

        Block volumes are copied in full with ``qemu-img convert`` rather than made a
        copy-on-write overlay: an overlay needs a base that never changes again, and the
        source stays a live, writable volume. (The daemon can still make instant clones
        from a frozen base, such as an image or a snapshot, with ``qcow2.create(backing=)``.)
        Filesystem volumes are copied with ``cp -a --reflink=auto``, which shares blocks on
        btrfs and XFS. The source must not be in use: neither copy is crash-consistent.
        """
        source = self._existing(src, content)
        self._free(dst)
        target = self.volume_path(dst, content)
        if content == "block":
            qcow2.convert(source, target, progress=progress)
            os.chmod(target, 0o600)
        else:
            _copy_tree(source, target)
            if progress is not None:
                progress(1.0)
        return target

    def usage(self) -> tuple[int, int, int]:
        try:
            st = os.statvfs(self.path)
        except FileNotFoundError as exc:
            raise NotFound(
                f"the pool directory {self.path} does not exist",
                hint="it was removed behind vzkit's back: recreate it or delete the pool",
            ) from exc
        total = st.f_blocks * st.f_frsize
        # bavail, not bfree: blocks reserved for root are not ours to promise.
        return total, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize

    def used_bytes(self, name: str, content: Content) -> int:
        path = self._existing(name, content)
        if content == "block":
            return qcow2.actual_size(path)
        return _disk_usage(path)

    def _taken(self, name: str) -> Conflict:
        return Conflict(
            f"volume {name!r} already exists in {self.volumes_dir}",
            hint=f"pick another name, or delete it first: vz volume delete {name}",
        )

    def _missing(self, name: str, content: Content | None = None) -> NotFound:
        kind = f"{content} volume" if content else "volume"
        return NotFound(f"no {kind} {name!r} in {self.volumes_dir}", hint=_LIST_HINT)

    def _free(self, name: str) -> None:
        if any(self.volume_path(name, c).exists() for c in ("block", "filesystem")):
            raise self._taken(name)

    def _existing(self, name: str, content: Content) -> Path:
        path = self.volume_path(name, content)
        if not (path.is_file() if content == "block" else path.is_dir()):
            raise self._missing(name, content)
        return path


def _copy_tree(src: Path, dst: Path) -> None:
    tmp = _tmp(dst)
    _remove(tmp)
    argv = ["cp", "-a", "--reflink=auto", "-T", "--", str(src), str(tmp)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise HostUnsupported("cp is not installed", hint="apt-get install coreutils") from exc
    if proc.returncode != 0:
        _remove(tmp)
        err = proc.stderr.strip()[-2000:]
        if "No space left on device" in err:
            raise ResourceExhausted(
                f"no space left on the file system of {dst.parent} while copying {src.name}",
                hint="free some space there (or use a pool on a larger file system) and retry",
            )
        raise EngineError(f"copying {src} to {dst} failed: {err}")
    try:
        tmp.rename(dst)
    except OSError as exc:
        _remove(tmp)
        raise Conflict(f"{dst} appeared while it was being copied") from exc


def _disk_usage(root: Path) -> int:
    """Allocated bytes under root (like ``du -s``): hard links counted once, no symlink
    followed."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(path: str) -> None:
        nonlocal total
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # removed while we walked
            return
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512

    add(str(root))
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            add(os.path.join(top, name))
    return total
