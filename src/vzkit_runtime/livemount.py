"""Bind mounts into and out of a running container: two non-OCI ``vz-runtime`` commands.

    vz-runtime [--root R] mount [--readonly] ID SOURCE TARGET
    vz-runtime [--root R] umount ID TARGET

``mount`` makes the host path SOURCE (a directory or a file) appear at TARGET (an absolute
path in the container), creating TARGET when it is missing (``mkdir -p`` for a directory,
an empty file, after its parent directories, for a file); ``--readonly`` makes the mount
and every mount under it read-only; it is always nosuid and nodev. ``umount`` detaches
(MNT_DETACH) the mount at TARGET.
Both exit 0 on success; on failure they print ``error: ...`` and ``hint: ...`` on stderr,
exit 1 and leave nothing behind (a mount point they created is removed again).

After pivot_root a host path is out of the container's reach, and a multi-threaded caller
(the daemon) cannot setns(CLONE_NEWNS); this single-threaded runtime can. ``mount`` clones
SOURCE on the host side with the new mount API (``open_tree(OPEN_TREE_CLONE |
AT_RECURSIVE)``, then ``mount_setattr`` for read-only and private propagation: nothing the
container mounts under TARGET reaches the host), then a forked child joins the namespaces
of the container's init (the user namespace first, the mount namespace last: the helper
``exec`` uses), chdirs to the container's ``/`` and attaches the clone with ``move_mount``:
the open_tree fd outlives the setns (see nsjoin.py for why a child does it).

TARGET must be absolute, without ``..``, and not ``/``; it is resolved in the container's
root (its symlinks cannot lead out of it). Whether it is a mount point is read from the
init's /proc/PID/mountinfo on the host side (the child, outside the container's pid
namespace, has no /proc/self there). The container must be created, running or paused.

Imports stdlib + ctypes only, and only ``mount``/``umount`` import this module.
"""

from __future__ import annotations

import _stat as stat
import errno

from vzkit_runtime import _os as os
from vzkit_runtime import syscalls as sc
from vzkit_runtime.errors import Conflict, InvalidConfig, NotFound, StateError
from vzkit_runtime.nsjoin import in_container, live
from vzkit_runtime.syscalls import SyscallError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from vzkit_runtime.state import State


def check_target(target: str) -> str:
    """TARGET, normalised; InvalidConfig unless absolute, without ``..`` and not ``/``."""
    if not target.startswith("/"):
        raise InvalidConfig(
            f"mount target {target!r} is not an absolute path",
            hint="give the path as the container sees it, e.g. /mnt/data",
        )
    if ".." in target.split("/"):
        raise InvalidConfig(
            f"mount target {target!r} contains '..'",
            hint="give the path without '..' components, e.g. /mnt/data",
        )
    norm = os.path.normpath(target)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")  # POSIX keeps a leading "//"
    if norm == "/":
        raise InvalidConfig(
            "mount target / is the container's root",
            hint="pick a path below it, e.g. /mnt/data",
        )
    return norm


def mount(
    root: str, container_id: str, source: str, target: str, *, readonly: bool = False
) -> None:
    """Bind-mount the host path ``source`` at ``target`` in the running container."""
    target = check_target(target)
    st = live(root, container_id, "mount into")
    source = os.path.abspath(source)
    try:
        is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    except FileNotFoundError:
        raise NotFound(
            f"mount source {source} does not exist",
            hint="create it on the host first, or check the path",
        ) from None
    except OSError as exc:
        raise SyscallError("stat", exc.errno or errno.EIO, source) from None
    mounted = _mount_points(st)
    if target in mounted:
        raise _busy(container_id, target)
    fd = sc.open_tree(
        sc.AT_FDCWD, source, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_RECURSIVE
    )
    try:
        # Private: what is mounted under either side later stays on that side.
        sc.mount_setattr(
            fd,
            "",
            sc.AT_EMPTY_PATH | sc.AT_RECURSIVE,
            # Data, not programs or devices, as a volume's OCI mount options say (nosuid,
            # nodev): nothing in it runs setuid in the container or opens a device.
            attr_set=sc.MOUNT_ATTR_NOSUID
            | sc.MOUNT_ATTR_NODEV
            | (sc.MOUNT_ATTR_RDONLY if readonly else 0),
            propagation=sc.MS_PRIVATE,
            shown=source,
        )

        def attach() -> None:
            real = os.path.realpath(target)
            if real in mounted:
                raise _busy(container_id, target)
            made = _make_mount_point(real, is_dir=is_dir)
            try:
                sc.move_mount(fd, "", sc.AT_FDCWD, real, sc.MOVE_MOUNT_F_EMPTY_PATH)
            except SyscallError as exc:
                _remove_made(made)
                raise SyscallError("move_mount", exc.errno, f"{source} on {target}") from None
            except BaseException:
                _remove_made(made)
                raise

        in_container(st, attach)
    finally:
        # After move_mount the tree is attached and closing the fd leaves it be; before,
        # closing it dissolves the clone.
        os.close(fd)


def umount(root: str, container_id: str, target: str) -> None:
    """Detach the mount at ``target`` in the running container (umount2 MNT_DETACH)."""
    target = check_target(target)
    st = live(root, container_id, "unmount in")
    mounted = _mount_points(st)

    def detach() -> None:
        real = os.path.realpath(target)
        if real not in mounted:
            raise InvalidConfig(
                f"{target} is not a mount point in container {container_id!r}",
                hint="`vz-runtime exec ID cat /proc/self/mountinfo` lists its mounts",
            )
        sc.umount2(real, sc.MNT_DETACH)

    in_container(st, detach)


# ---------------------------------------------------------------------------- host side


def _busy(container_id: str, target: str) -> Conflict:
    return Conflict(
        f"{target} is already a mount point in container {container_id!r}",
        hint=f"unmount it first (vz-runtime umount {container_id} {target}), "
        "or pick another target",
    )


def _mount_points(st: State) -> set[str]:
    """The init's mount points, as paths in the container (mountinfo shows them relative
    to the reading task's root)."""
    from vzkit_runtime.mounts import read_mountinfo

    try:
        with open(f"/proc/{st.pid}/mountinfo") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise StateError(f"container {st.id!r} stopped", hint="its init exited meanwhile") from None
    return {m["mountpoint"] for m in read_mountinfo(text)}


# ---------------------------------------------------------------------------- child side
# No imports from here on: the host's Python library is out of reach after setns.


def _make_mount_point(path: str, *, is_dir: bool) -> list[str]:
    """``mkdir -p path``, or its parents and an empty file; what it created, in order."""
    made: list[str] = []
    parent = path if is_dir else os.path.dirname(path)
    current = ""
    try:
        for name in parent.split("/"):
            if not name:
                continue
            current += "/" + name
            try:
                os.mkdir(current, 0o755)
                made.append(current)
            except FileExistsError:
                if os.path.isdir(current):
                    continue
                if current == path:
                    raise _wrong_type(path, want_dir=True) from None
                raise SyscallError("mkdir", errno.ENOTDIR, current) from None
            except OSError as exc:
                raise _create_error("mkdir", exc, current) from None
        if is_dir:
            return made
        try:
            fd = os.open(
                path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
            os.close(fd)
            made.append(path)
        except FileExistsError:
            if os.path.isdir(path):
                raise _wrong_type(path, want_dir=False) from None
        except OSError as exc:
            raise _create_error("open", exc, path) from None
    except BaseException:
        _remove_made(made)
        raise
    return made


def _create_error(syscall: str, exc: OSError, path: str) -> SyscallError:
    err = SyscallError(syscall, exc.errno or errno.EIO, path)
    if exc.errno == errno.EROFS:
        err.hint = (
            "the target is missing and its parent is on a read-only mount (root.readonly?): "
            "pick a target that exists, or one on a writable mount such as a tmpfs"
        )
    return err


def _wrong_type(path: str, *, want_dir: bool) -> InvalidConfig:
    what, other = ("a directory", "a file") if want_dir else ("a file", "a directory")
    return InvalidConfig(
        f"{path} exists in the container and is not {what}",
        hint=f"{what} cannot be mounted over {other}: pick another target",
    )


def _remove_made(made: list[str]) -> None:
    """Undo _make_mount_point: the innermost first; only what is still empty."""
    for path in reversed(made):
        try:
            if os.path.isdir(path):
                os.rmdir(path)  # refuses a directory something was put in meanwhile
            elif os.path.getsize(path) == 0:
                os.unlink(path)
        except OSError:
            pass
