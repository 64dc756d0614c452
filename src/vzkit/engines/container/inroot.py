"""Writing a file into a container's root from the host, as the container would see it.

A container's tree is the container's: any of its directories may be a symlink, absolute
or full of ``..``, and the daemon writes as host root. Every path is therefore resolved by
the kernel with ``openat2(RESOLVE_IN_ROOT)`` below an fd of the container's root: a
symlink's ``/`` is that root and ``..`` stops there, magic links (``/proc/self/...``) and
other mounts are refused. The last component is created beside its target and renamed
over it in the directory fd found that way, so a symlink there is replaced, never written
through. No binary of the image runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import posixpath
import secrets
from pathlib import Path

from vzkit.errors import EngineError

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same on every architecture (Linux 5.6)
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """``path`` resolved with ``root_fd`` as ``/`` (openat2 RESOLVE_IN_ROOT, staying on
    the root's mount, no magic links); returns the new fd (O_CLOEXEC)."""
    how = _OpenHow(
        flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV
    )
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def replace_file(root: Path, path: str, data: bytes, *, mode: int, owner: tuple[int, int]) -> None:
    """Make ``path`` (absolute, as the container sees it) a regular file holding ``data``,
    owned by ``owner`` (host ids) with ``mode``; its directory must exist."""
    parent, name = posixpath.split(posixpath.normpath("/" + path))
    if not name or name in (".", ".."):
        raise EngineError(f"cannot write {path!r} in a container: not a file path")
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            dir_fd = open_in_root(root_fd, parent, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            raise EngineError(f"cannot open {parent} in the container: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    tmp = f".{name}.vz-{secrets.token_hex(4)}"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=dir_fd,
        )  # fmt: skip
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after chown, which would clear setuid bits
        finally:
            os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise EngineError(f"cannot replace {path} in the container: {exc.strerror}") from None
    except OSError as exc:
        raise EngineError(f"cannot write {path} in the container: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
