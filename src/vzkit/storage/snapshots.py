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
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from vzkit.api.bounds import NAME_RE, NAME_RULE
from vzkit.api.snapshots import SnapshotInfo
from vzkit.errors import Conflict, InvalidConfig, NotFound
from vzkit.host import safefs

__all__ = ["SnapshotStore"]

_TMP = ".tmp-"
META = "meta.json"
META_MAX = 1 << 20


class SnapshotStore:
    """The snapshots of one instance."""

    def __init__(self, instance_dir: Path, instance: str) -> None:
        self.root = instance_dir / "snapshots"
        self.instance = instance

    def path(self, name: str) -> Path:
        return self.root / name

    def _names(self) -> builtins.list[str]:
        """The snapshot directories (their own entries, not links), half-built ones aside."""
        if not safefs.exists(self.root.parent, self.root.name, stat.S_IFDIR):
            return []
        return [
            entry.name
            for entry in os.scandir(self.root)
            if not entry.name.startswith(_TMP) and entry.is_dir(follow_symlinks=False)
        ]

    def _read(self, name: str) -> SnapshotInfo | None:
        """``name``'s meta.json, read below the store without following a link."""
        try:
            raw = safefs.read_bytes(self.root, f"{name}/{META}", META_MAX)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return SnapshotInfo.model_validate_json(raw)

    def list(self) -> builtins.list[SnapshotInfo]:
        out = [info for name in self._names() if (info := self._read(name)) is not None]
        return sorted(out, key=lambda s: s.created_at)

    def get(self, name: str) -> SnapshotInfo:
        info = self._read(name) if NAME_RE.match(name) else None
        if info is None:
            raise NotFound(
                f"instance {self.instance!r} has no snapshot {name!r}",
                hint=f"list them: vz snapshot list {self.instance}",
            )
        return info

    def verify(self) -> builtins.list[SnapshotInfo]:
        """Check snapshots that came from elsewhere (an imported archive): each is a valid
        name holding a valid meta.json of its own name; InvalidConfig names the first that
        is not. Half-built leftovers are removed first."""
        self.cleanup()
        out = []
        for name in self._names():
            try:
                info = self._read(name) if NAME_RE.match(name) else None
            except (OSError, ValueError, ValidationError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not a valid snapshot record"
                raise InvalidConfig(
                    f"the archive's snapshot {name!r} has a bad {META}: {why}",
                    hint="export the instance again with vz export",
                ) from exc
            if info is None or info.name != name:
                raise InvalidConfig(
                    f"the archive's snapshot directory {name!r} is not a snapshot",
                    hint="export the instance again with vz export",
                )
            out.append(info)
        return out

    @contextmanager
    def building(self, name: str) -> Iterator[Path]:
        """A scratch directory for snapshot ``name``; published only if the block succeeds.

        The caller writes its files into the yielded directory and finally ``meta.json``
        (:meth:`write_meta`); anything raised removes the directory.
        """
        if not NAME_RE.match(name):
            raise Conflict(f"invalid snapshot name {name!r}: {NAME_RULE}")
        if os.path.lexists(self.path(name)):
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
            if not safefs.exists(tmp, META):
                raise RuntimeError("snapshot built without meta.json")
            _fsync_dir(tmp)
            os.rename(tmp, self.path(name))
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def write_meta(directory: Path, info: SnapshotInfo) -> None:
        safefs.replace_bytes(directory, META, info.model_dump_json(indent=1).encode(), 0o600)

    def delete(self, name: str) -> None:
        self.get(name)
        # Renamed away first: a crash half-way through rmtree leaves a leftover, not a
        # snapshot with missing files.
        doomed = self.root / f"{_TMP}deleted-{name}"
        os.rename(self.path(name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def cleanup(self) -> builtins.list[str]:
        """Remove half-built or half-deleted snapshots; returns their directory names."""
        if not safefs.exists(self.root.parent, self.root.name, stat.S_IFDIR):
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
