"""User namespaces for containers: the host ids their root maps to, and the overlay that
shows them the image's files as their own (an idmapped lower layer, not a copy).

An unprivileged container's uids and gids 0..size-1 are host ids base..base+size-1, from
the first range ``/etc/subuid`` and ``/etc/subgid`` give root (scripts/setup adds Incus'
default, ``root:1000000:1000000000``, when there is none). Host uid 0 is never inside, so
nothing a container writes is owned by host root, and its root has no power over the host.

One map serves every unprivileged container, as Incus' default does. A container's files
(its upper layer, snapshots, copies, exports, filesystem volumes) then keep the owners they
were written with wherever they go: a copy, a restore or a volume moved to another
container needs no walk that re-owns every file, and one shared lower tree serves all
containers of an image. Containers are kept apart by their namespaces and cgroups, not by
their uids; what sharing costs is that a process that escaped one container's namespaces
would own the other containers' files too (``security.idmap.isolated`` in Incus terms is
left for later).

The image's tree stays owned by host root on disk and is shown to the container through an
idmapped mount (``open_tree`` clone, ``mount_setattr(MOUNT_ATTR_IDMAP)`` with a user
namespace holding the map), used as the overlay's lower layer: host uid 0 appears as the
container's root. The user namespace is made once per map by a short-lived ``unshare``
child and kept as an fd for the daemon's life.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from vzkit.errors import EngineError, HostUnsupported

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
# Container ids 0..65535 at least: every image's system users and nobody (65534).
MIN_SIZE = 65536
DEFAULT_RANGE = "root:1000000:1000000000"

_libc = ctypes.CDLL(None, use_errno=True)
# The new mount API's syscall numbers are the same on every architecture (since Linux 5.2).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_IDMAP = 0x00100000
_MNT_DETACH = 2


class IdMap(BaseModel):
    """Container ids 0..size-1 are host uids uid.. and gids gid.."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid: int
    gid: int
    size: int

    @property
    def root(self) -> tuple[int, int]:
        """The host uid and gid of the container's root."""
        return self.uid, self.gid

    def oci(self) -> dict[str, list[dict[str, int]]]:
        """The OCI ``linux.uidMappings``/``gidMappings`` of this map."""
        return {
            "uidMappings": [{"containerID": 0, "hostID": self.uid, "size": self.size}],
            "gidMappings": [{"containerID": 0, "hostID": self.gid, "size": self.size}],
        }

    def text(self) -> str:
        return f"{self.uid}:{self.gid}:{self.size}"

    @classmethod
    def parse(cls, text: str) -> IdMap:
        uid, gid, size = (int(x) for x in text.split(":"))
        return cls(uid=uid, gid=gid, size=size)


def _first_range(path: Path) -> tuple[int, int] | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in ("root", "0") and fields[1].isdigit():
            start, count = int(fields[1]), int(fields[2]) if fields[2].isdigit() else 0
            if start > 0 and count >= MIN_SIZE:
                return start, count
    return None


def host_idmap(subuid: Path = SUBUID, subgid: Path = SUBGID) -> IdMap:
    """The map unprivileged containers get: root's first subordinate ranges."""
    uids, gids = _first_range(subuid), _first_range(subgid)
    if uids is None or gids is None:
        missing = subuid if uids is None else subgid
        raise HostUnsupported(
            f"{missing} gives root no range of at least {MIN_SIZE} ids for containers' "
            "user namespaces",
            hint=f"add the line {DEFAULT_RANGE} to {subuid} and {subgid} (scripts/setup "
            "does), or create a privileged container: --privileged",
        )
    return IdMap(uid=uids[0], gid=gids[0], size=min(uids[1], gids[1]))


def make_userns(idmap: IdMap) -> int:
    """An fd of a new user namespace with ``idmap`` written (blocking, ~3 ms).

    The daemon is multi-threaded and must not fork itself: an ``unshare`` child creates
    the namespace and says so, the daemon writes its maps (root may map any ids), keeps
    a reference to it and lets the child go."""
    proc = subprocess.Popen(
        ["unshare", "--user", "--", "sh", "-c", "echo; read -r _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        if not proc.stdout.readline():
            raise HostUnsupported(
                f"cannot create a user namespace: {proc.stderr.read().decode().strip()}",
                hint="check user.max_user_namespaces (sysctl) and that unshare(1) is installed",
            )
        line = f"0 {{}} {idmap.size}\n"
        for kind, host in (("uid", idmap.uid), ("gid", idmap.gid)):
            with open(f"/proc/{proc.pid}/{kind}_map", "w") as f:
                f.write(line.format(host))
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _check(ret: int, what: str, path: object) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise EngineError(f"{what} {path}: {os.strerror(err)}")
    return ret


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _attach_idmapped(source: Path, target: Path, userns_fd: int) -> None:
    """A read-only clone of the mount at ``source`` whose owners go through the user
    namespace's map, attached at ``target``."""
    fd = _check(
        _libc.syscall(
            _SYS_OPEN_TREE, _AT_FDCWD, bytes(source), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
        ),
        "open_tree",
        source,
    )
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY, 0, 0, userns_fd)
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)
            ),
            "idmapped mount (mount_setattr) of",
            source,
        )
        _check(
            _libc.syscall(
                _SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, bytes(target), _MOVE_MOUNT_F_EMPTY_PATH
            ),
            "move_mount to",
            target,
        )
    finally:
        os.close(fd)


def mount_overlay(
    target: Path, lower: Path, upper: Path, work: Path, *, userns_fd: int | None, scratch: Path
) -> None:
    """The container's root at ``target``: ``upper`` over ``lower``, the lower layer
    idmapped through ``userns_fd`` when given (``scratch``: an empty directory where it is
    attached for the moment of the overlay mount; the overlay keeps its own reference)."""
    lowerdir = lower
    if userns_fd is not None:
        scratch.mkdir(mode=0o700, exist_ok=True)
        _attach_idmapped(lower, scratch, userns_fd)
        lowerdir = scratch
    try:
        options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
        _check(
            _libc.mount(b"overlay", bytes(target), b"overlay", 0, options.encode()),
            "mount overlayfs on",
            target,
        )
    finally:
        if userns_fd is not None:
            unmount(scratch)
            with contextlib.suppress(OSError):
                scratch.rmdir()


def unmount(target: Path) -> None:
    _check(_libc.umount2(bytes(target), _MNT_DETACH), "unmount", target)


def shift_owners(tree: Path, old: IdMap | None, new: IdMap | None) -> None:
    """Re-own a container's files written under map ``old`` (None: host ids) for ``new``
    (an import from a host whose map differs). Symlinks are not followed; setuid and
    setgid bits, which chown clears, are put back."""
    if old == new:
        return

    def move(value: int, old_base: int, new_base: int, size: int) -> int:
        inside = value - old_base
        return new_base + inside if 0 <= inside < size else value

    def shifted(st: os.stat_result) -> tuple[int, int]:
        size = min(old.size if old else 2**32, new.size if new else 2**32)
        return (
            move(st.st_uid, old.uid if old else 0, new.uid if new else 0, size),
            move(st.st_gid, old.gid if old else 0, new.gid if new else 0, size),
        )

    def one(path: str) -> None:
        st = os.lstat(path)
        uid, gid = shifted(st)
        if (uid, gid) == (st.st_uid, st.st_gid):
            return
        os.lchown(path, uid, gid)
        if st.st_mode & 0o6000 and not os.path.islink(path):
            os.chmod(path, st.st_mode & 0o7777)

    one(str(tree))
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            one(os.path.join(dirpath, name))
