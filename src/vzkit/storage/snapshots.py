"""Instance snapshots on disk: one directory each, published by a rename.

``<instance dir>/snapshots/<name>/`` holds ``meta.json`` (a :class:`SnapshotInfo`) and,
for a stateful snapshot, ``memory.state`` (the VM's RAM and device state); a container's
snapshot holds ``upper/`` (its file changes); a VM's disk state is a frozen qcow2 layer in
the instance directory that ``meta.json`` names. A snapshot is built in
``snapshots/.tmp-<name>/`` and renamed into place as its last step, so a crash or a kill
at any moment leaves either a complete snapshot or none; :func:`cleanup` removes the
leftovers.
"""

from __future__ import annotations

import builtins
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vzkit.api.bounds import NAME_RE, NAME_RULE
from vzkit.api.snapshots import SnapshotInfo
from vzkit.errors import Conflict, NotFound

__all__ = ["SnapshotStore"]

_TMP = ".tmp-"


class SnapshotStore:
    """The snapshots of one instance."""

    def __init__(self, instance_dir: Path, instance: str) -> None:
        self.root = instance_dir / "snapshots"
        self.instance = instance

    def path(self, name: str) -> Path:
        return self.root / name

    def list(self) -> list[SnapshotInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            meta = entry / "meta.json"
            if not entry.name.startswith(_TMP) and meta.is_file():
                out.append(SnapshotInfo.model_validate_json(meta.read_text()))
        return sorted(out, key=lambda s: s.created_at)

    def get(self, name: str) -> SnapshotInfo:
        meta = self.path(name) / "meta.json"
        if not NAME_RE.match(name) or not meta.is_file():
            raise NotFound(
                f"instance {self.instance!r} has no snapshot {name!r}",
                hint=f"list them: vz snapshot list {self.instance}",
            )
        return SnapshotInfo.model_validate_json(meta.read_text())

    @contextmanager
    def building(self, name: str) -> Iterator[Path]:
        """A scratch directory for snapshot ``name``; published only if the block succeeds.

        The caller writes its files into the yielded directory and finally ``meta.json``
        (:meth:`write_meta`); anything raised removes the directory.
        """
        if not NAME_RE.match(name):
            raise Conflict(f"invalid snapshot name {name!r}: {NAME_RULE}")
        if self.path(name).exists():
            raise Conflict(
                f"instance {self.instance!r} already has a snapshot {name!r}",
                hint=f"choose another name, or delete it: vz snapshot delete {self.instance} "
                f"{name}",
            )
        tmp = self.root / f"{_TMP}{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if not (tmp / "meta.json").is_file():
                raise RuntimeError("snapshot built without meta.json")
            _fsync_dir(tmp)
            os.rename(tmp, self.path(name))
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def write_meta(directory: Path, info: SnapshotInfo) -> None:
        (directory / "meta.json").write_text(info.model_dump_json(indent=1))

    def delete(self, name: str) -> None:
        self.get(name)
        # Renamed away first: a crash half-way through rmtree leaves a leftover, not a
        # snapshot with missing files.
        doomed = self.root / f"{_TMP}deleted-{name}"
        os.rename(self.path(name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def cleanup(self) -> builtins.list[str]:
        """Remove half-built or half-deleted snapshots; returns their directory names."""
        if not self.root.is_dir():
            return []
        gone: builtins.list[str] = []
        for entry in self.root.iterdir():
            if entry.name.startswith(_TMP):
                shutil.rmtree(entry, ignore_errors=True)
                gone.append(entry.name)
        return gone


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
