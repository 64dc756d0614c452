"""Opening files below a directory without following links: the one way vzd touches paths
inside directories that something else may have written (an imported archive, a
container's files, a snapshot).

Every helper takes a trusted directory (a path vzd made, or an open directory fd) and a
path relative to it. Each component of that relative path is resolved without following
symbolic links and without leaving the directory: through ``openat2(2)`` with
``RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`` where the kernel has it (5.6+), else one
component at a time with ``O_NOFOLLOW`` below the previous component's fd. A symlink
anywhere on the way fails with ``ELOOP`` (``ENOTDIR`` for a symlink in place of a
directory), ``..`` and absolute paths with ``EXDEV``: the caller never reaches a file the
link's author chose.

``in_root=True`` resolves instead as if the directory were ``/`` (``RESOLVE_IN_ROOT``: a
container's own absolute symlinks stay inside its root); without openat2 it falls back to
refusing every symlink, which is stricter.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = [
    "chown",
    "dir_fd",
    "exists",
    "lstat",
    "mkdirs",
    "open_at",
    "open_dir",
    "open_file",
    "parent",
    "read_bytes",
    "read_tail",
    "read_text",
    "rename",
    "replace_bytes",
    "tree_size",
    "truncate",
    "unlink",
    "walk",
]

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Root = Path | int  # a trusted directory: its path, or an open fd of it


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None


def _openat2(dirfd: int, rel: str, flags: int, mode: int, resolve: int) -> int | None:
    """The fd, or None when the kernel (or a seccomp filter) has no openat2."""
    global _have_openat2
    if _have_openat2 is False:
        return None
    # openat2 refuses a mode without O_CREAT or O_TMPFILE (which includes O_DIRECTORY's bit)
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creates else 0, resolve)
    for _ in range(16):
        fd = _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_long(dirfd),
            ctypes.c_char_p(os.fsencode(rel)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            _have_openat2 = True
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            break  # EAGAIN: a rename raced a ".." check of RESOLVE_IN_ROOT; try again
    if err in (errno.ENOSYS, errno.EPERM) and _have_openat2 is None:
        _have_openat2 = False
        return None
    raise OSError(err, os.strerror(err), rel)


def _parts(rel: str | Path) -> list[str]:
    text = os.fspath(rel)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if text.startswith("/") or ".." in parts:
        raise OSError(errno.EXDEV, "path leaves its directory", text)
    return parts


def _walk(dirfd: int, parts: list[str], flags: int, mode: int) -> int:
    """openat2's fallback: one component at a time, none of them followed."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=dirfd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1] if parts else ".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                       dir_fd=fd)  # fmt: skip
    finally:
        os.close(fd)


def open_at(
    dirfd: int, rel: str | Path, flags: int, mode: int = 0o600, *, in_root: bool = False
) -> int:
    """``rel`` below the directory ``dirfd``, no link followed; returns a new fd."""
    parts = _parts(rel)
    resolve = RESOLVE_NO_MAGICLINKS | (
        RESOLVE_IN_ROOT if in_root else RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
    )
    fd = _openat2(dirfd, "/".join(parts) or ".", flags | os.O_NOFOLLOW, mode, resolve)
    return fd if fd is not None else _walk(dirfd, parts, flags, mode)


def open_dir(path: Path) -> int:
    """A trusted directory's fd (its own last component must not be a link either)."""
    return os.open(path, _DIR_FLAGS)


@contextmanager
def dir_fd(root: Root, rel: str | Path = "", *, create: bool = False) -> Iterator[int]:
    """The directory ``rel`` below ``root`` (made, with parents, if ``create``), as an fd
    closed on exit."""
    base = open_dir(root) if isinstance(root, Path) else os.dup(root)
    try:
        fd = mkdirs(base, rel) if create else open_at(base, rel, _DIR_FLAGS)
    finally:
        os.close(base)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def parent(root: Root, rel: str | Path) -> Iterator[tuple[int, str]]:
    """(fd of ``rel``'s directory, ``rel``'s last component), for the ``*at`` calls."""
    parts = _parts(rel)
    if not parts:
        raise OSError(errno.EINVAL, "a path below the directory is needed", os.fspath(rel))
    with dir_fd(root, "/".join(parts[:-1])) as fd:
        yield fd, parts[-1]


def mkdirs(dirfd: int, rel: str | Path, mode: int = 0o700) -> int:
    """Make ``rel`` below ``dirfd`` with its parents (none of them a link); its fd."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=dirfd)
    try:
        for part in _parts(rel):
            with suppress(FileExistsError):
                os.mkdir(part, mode, dir_fd=fd)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(root: Root, rel: str | Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A file below ``root`` as an fd; only a regular file (a FIFO or device is refused
    before it can block or act)."""
    with dir_fd(root) as base:
        fd = open_at(base, rel, flags | os.O_NONBLOCK, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(rel))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(root: Root, rel: str | Path, limit: int) -> bytes:
    """The whole file, which must be no larger than ``limit`` (EFBIG if it is)."""
    fd = open_file(root, rel)
    try:
        if os.fstat(fd).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(rel))
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # it grew while being read
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(rel))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(root: Root, rel: str | Path, limit: int = 1 << 20) -> str:
    return read_bytes(root, rel, limit).decode()


def read_tail(root: Root, rel: str | Path, limit: int, start: int = 0) -> bytes:
    """The file's last ``limit`` bytes (none before ``start``): for logs of any size."""
    fd = open_file(root, rel)
    try:
        offset = max(start, os.fstat(fd).st_size - limit)
        return os.pread(fd, limit, offset)
    finally:
        os.close(fd)


def replace_bytes(
    root: Root,
    rel: str | Path,
    data: bytes,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write a file whole under a temporary name, then rename it over ``rel``: a link
    there is replaced, never written through, and readers see the old or the new file."""
    with parent(root, rel) as (pfd, name):
        tmp = f".{name}.{uuidlib.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=pfd)  # fmt: skip
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=pfd)
            raise


def truncate(
    root: Root, rel: str | Path, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Create ``rel`` empty, or empty it (a file another process keeps appending to, such
    as a console log, so it is emptied in place rather than replaced)."""
    fd = open_file(root, rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


def lstat(root: Root, rel: str | Path) -> os.stat_result | None:
    """``rel``'s own status (a link is reported as a link), or None if it is missing (or
    a directory on the way is missing or a link)."""
    try:
        with parent(root, rel) as (pfd, name):
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise


def exists(root: Root, rel: str | Path, kind: int = stat.S_IFREG) -> bool:
    """``rel`` is there and of ``kind`` (a regular file by default) itself, not by a link."""
    st = lstat(root, rel)
    return st is not None and stat.S_IFMT(st.st_mode) == kind


def unlink(root: Root, rel: str | Path, *, missing_ok: bool = True) -> None:
    try:
        with parent(root, rel) as (pfd, name):
            os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        if not missing_ok:
            raise


def rename(root: Root, src: str | Path, dst: str | Path) -> None:
    with parent(root, src) as (sfd, sname), parent(root, dst) as (dfd, dname):
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)


def chown(root: Root, rel: str | Path, uid: int, gid: int) -> None:
    """Change ``rel``'s owner; a link there has its own owner changed, not its target's."""
    with parent(root, rel) as (pfd, name):
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)


def walk(root: Root) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root`` (relative path, its own status), parents first; links
    are reported, never followed, and nothing below a link is visited."""
    with dir_fd(root) as base:
        pending = [""]
        while pending:
            rel = pending.pop()
            fd = open_at(base, rel, _DIR_FLAGS) if rel else os.dup(base)
            try:
                with os.scandir(fd) as entries:
                    found = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
            finally:
                os.close(fd)
            for name, st in found:
                path = f"{rel}/{name}" if rel else name
                yield path, st
                if stat.S_ISDIR(st.st_mode):
                    pending.append(path)


def tree_size(path: Path, *, allocated: bool = False) -> int:
    """The bytes of the regular files below ``path`` (``allocated``: the blocks of every
    entry), walked without following a link; 0 if ``path`` is not a directory itself."""
    if not os.path.lexists(path) or not stat.S_ISDIR(os.lstat(path).st_mode):
        return 0
    if allocated:
        return sum(st.st_blocks * 512 for _, st in walk(path))
    return sum(st.st_size for _, st in walk(path) if stat.S_ISREG(st.st_mode))
