"""Files of a running container, read and written without running any of its binaries:
two non-OCI ``vz-runtime`` commands.

    vz-runtime [--root R] file-read [--header] ID PATH         (the file on stdout)
    vz-runtime [--root R] file-write [--mode M] [--parents] [--allow-setid] ID PATH  (stdin)

A forked child joins the container's user namespace (when it has one, and becomes its
root, so new files belong to the container's root) and its mount namespace (nsjoin.py);
its root is then the container's ``/``, so PATH and every symlink on the way resolve as
in the container (an absolute link or ``../../..`` stays inside it), through the
container's own mounts (a tmpfs /tmp, volumes). The image needs no shell, no cat.

``file-write`` writes stdin to a new file beside PATH and renames it over PATH: readers
see the old file or the new one, never a part. PATH itself, if a symlink, is replaced, not
written through. ``--mode`` is octal (default 644); setuid and setgid bits are refused
unless ``--allow-setid`` is given. ``--parents`` makes missing directories (0755).

``file-read`` streams a regular file to stdout (a device, fifo or directory is refused:
the helper is not limited by the container's device cgroup, so it opens none). With
``--header`` the first line is JSON: ``{"mode": st_mode, "size": bytes}``.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found,unused-ignore]  # signal's enums cost ms
import _stat as stat

from vzkit_runtime import _os as os
from vzkit_runtime import jsonfast as json
from vzkit_runtime.errors import InvalidConfig, NotFound, StateError
from vzkit_runtime.nsjoin import in_container, live

_CHUNK = 1 << 20
_KINDS = ("user", "mount")


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise InvalidConfig(f"invalid mode {text!r}", hint="give octal permissions, e.g. 644")
    return mode


def _check_path(path: str) -> str:
    if not path.startswith("/") or path.rstrip("/") == "" or "\0" in path:
        raise InvalidConfig(
            f"invalid path {path!r}: give an absolute path of a file in the container",
            hint="e.g. /etc/motd",
        )
    return os.path.normpath(path)


def _own_userns(pid: int) -> bool:
    """Whether the container's init has a user namespace of its own (read on the host:
    the child, outside the container's pid namespace, has no /proc/self in there)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    except (FileNotFoundError, ProcessLookupError):
        raise StateError("the container stopped", hint="its init exited meanwhile") from None


def _become_root(userns: bool) -> None:
    """In the container's user namespace, act as its root: new files get its owner."""
    if not userns:
        return
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    except OSError as exc:
        raise InvalidConfig(
            f"cannot act as the container's root: {exc.strerror}",
            hint="map uid and gid 0 in the container's user namespace",
        ) from None


def write(
    root: str, container_id: str, path: str, *, mode: int, parents: bool, allow_setid: bool
) -> None:
    """Replace ``path`` in the container with stdin, atomically."""
    path = _check_path(path)
    if mode & 0o6000 and not allow_setid:
        raise InvalidConfig(
            f"mode {mode:o} sets setuid or setgid",
            hint="pass --allow-setid if a setuid/setgid file is really wanted",
        )
    st = live(root, container_id, "write a file in")
    userns = _own_userns(st.pid)
    runtime_pid = os.getpid()

    def work() -> None:
        _die_with(runtime_pid)
        _become_root(userns)
        parent, name = os.path.split(path)
        if parents:
            _makedirs(parent)
        try:
            dirfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(
                f"directory {parent} does not exist in the container",
                hint="create it first, or pass --parents",
            ) from None
        try:
            _replace(dirfd, name, mode, path)
        finally:
            os.close(dirfd)

    in_container(st, work, _KINDS)


def _stop(_signum: int, _frame: object) -> None:
    raise SystemExit(128 + 15)


def _die_with(runtime_pid: int) -> None:
    """Stop, without committing the file, if the runtime is stopped: a caller that gives
    up mid-stream kills the runtime, and the end of input must then not count as the end
    of the file. SIGTERM unwinds _replace, which removes its temporary file."""
    from vzkit_runtime import syscalls as sc

    _signal.signal(15, _stop)
    sc.prctl(sc.PR_SET_PDEATHSIG, 15)
    if os.getppid() != runtime_pid:
        raise SystemExit(128 + 15)  # it died before PDEATHSIG was set


def _makedirs(parent: str) -> None:
    """``mkdir -p`` (0755) through symlinks: they resolve in the container's root."""
    current = ""
    for part in os.path.realpath(parent).split("/"):
        if not part:
            continue
        current += "/" + part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if not os.path.isdir(current):
                raise InvalidConfig(f"{current} exists and is not a directory") from None


def _replace(dirfd: int, name: str, mode: int, shown: str) -> None:
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            raise InvalidConfig(f"{shown} is a directory", hint="give the path of a file")
    except FileNotFoundError:
        pass
    tmp = f".{name}.vz-{os.getpid()}-{os.urandom(4).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dirfd)
    try:
        try:
            while data := os.read(0, _CHUNK):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        raise


def read(root: str, container_id: str, path: str, *, header: bool) -> None:
    """Copy the regular file ``path`` of the container to stdout."""
    path = _check_path(path)
    st = live(root, container_id, "read a file of")
    userns = _own_userns(st.pid)
    # The host's /proc, to reopen what the child found (the container's /proc, if any,
    # shows only its own pid namespace, where the child is not).
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def work() -> None:
        _become_root(userns)
        try:
            found = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{path} does not exist in the container") from None
        info = os.fstat(found)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidConfig(f"{path} is not a regular file", hint="give the path of a file")
        # Opened through the O_PATH descriptor: the very inode checked above.
        fd = os.open(f"self/fd/{found}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        os.close(found)
        if header:
            line = json.dumps({"mode": info.st_mode, "size": info.st_size}) + "\n"
            os.write(1, line.encode())
        while data := os.read(fd, _CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]

    try:
        in_container(st, work, _KINDS)
    finally:
        os.close(proc)
