"""Root filesystem set-up inside the container's new mount namespace (what runc's
``prepareRootfs``/``finalizeRootfs`` do).

The order, all in :func:`prepare_rootfs`:

1. ``/`` gets ``linux.rootfsPropagation`` (default ``rslave``) so nothing we mount leaks
   back to the host; the rootfs's parent mount is made private if it was shared, which
   pivot_root requires.
2. The rootfs is bind-mounted onto itself (pivot_root needs a mount point).
3. ``/dev`` is a tmpfs unless the spec mounts something there; every ``mounts[]`` entry is
   mounted in order; then (when /dev is not a bind of the host) the default devices,
   ``linux.devices`` and the /dev symlinks are created.
4. pivot_root(".", ".") and a lazy unmount of the old root, as runc does.
5. Masked paths, read-only paths, then read-only /dev and ``root.readonly``.

Every destination is resolved inside the rootfs as the container would see it (absolute
symlinks are relative to the rootfs, ``..`` stops at its top; see :func:`resolve_in_root`)
and mounted through an ``O_PATH`` descriptor that is checked to still lie inside the
rootfs, so a hostile image cannot point a mount at the host (CVE-2021-30465 class).

cgroup mounts on a v1/v2 hybrid host are emulated like runc without a cgroup namespace:
a tmpfs holding a bind of the container's own cgroup directory for every hierarchy
mounted under /sys/fs/cgroup (the init must already be in its cgroups). On a pure v2
host a fresh cgroup2 is mounted. ``tmpcopyup`` and the idmapped/recursive mount options
are not supported.

Imports stdlib + ctypes only: this runs in ``vz-runtime``'s container init.
"""

from __future__ import annotations

import _stat as stat
import errno

from vzkit_runtime import _os as os
from vzkit_runtime import syscalls as sc
from vzkit_runtime.errors import InvalidConfig
from vzkit_runtime.syscalls import SyscallError

TYPE_CHECKING = False
if TYPE_CHECKING:
    # typing and pathlib cost milliseconds to import; paths are plain strings at run time.
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

# option -> (clear?, flag); from mount(8), the same table runc uses.
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "acl": (False, sc.MS_POSIXACL),
    "async": (True, sc.MS_SYNCHRONOUS),
    "atime": (True, sc.MS_NOATIME),
    "bind": (False, sc.MS_BIND),
    "defaults": (False, 0),
    "dev": (True, sc.MS_NODEV),
    "diratime": (True, sc.MS_NODIRATIME),
    "dirsync": (False, sc.MS_DIRSYNC),
    "exec": (True, sc.MS_NOEXEC),
    "iversion": (False, sc.MS_I_VERSION),
    "lazytime": (False, sc.MS_LAZYTIME),
    "loud": (True, sc.MS_SILENT),
    "mand": (False, sc.MS_MANDLOCK),
    "noacl": (True, sc.MS_POSIXACL),
    "noatime": (False, sc.MS_NOATIME),
    "nodev": (False, sc.MS_NODEV),
    "nodiratime": (False, sc.MS_NODIRATIME),
    "noexec": (False, sc.MS_NOEXEC),
    "noiversion": (True, sc.MS_I_VERSION),
    "nolazytime": (True, sc.MS_LAZYTIME),
    "nomand": (True, sc.MS_MANDLOCK),
    "norelatime": (True, sc.MS_RELATIME),
    "nostrictatime": (True, sc.MS_STRICTATIME),
    "nosuid": (False, sc.MS_NOSUID),
    "nosymfollow": (False, sc.MS_NOSYMFOLLOW),
    "rbind": (False, sc.MS_BIND | sc.MS_REC),
    "relatime": (False, sc.MS_RELATIME),
    "remount": (False, sc.MS_REMOUNT),
    "ro": (False, sc.MS_RDONLY),
    "rw": (True, sc.MS_RDONLY),
    "silent": (False, sc.MS_SILENT),
    "strictatime": (False, sc.MS_STRICTATIME),
    "suid": (True, sc.MS_NOSUID),
    "sync": (False, sc.MS_SYNCHRONOUS),
    "symfollow": (True, sc.MS_NOSYMFOLLOW),
}

#: Propagation option (also rootfsPropagation values) -> mount flags.
PROPAGATION: dict[str, int] = {
    "private": sc.MS_PRIVATE,
    "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "shared": sc.MS_SHARED,
    "rshared": sc.MS_SHARED | sc.MS_REC,
    "slave": sc.MS_SLAVE,
    "rslave": sc.MS_SLAVE | sc.MS_REC,
    "unbindable": sc.MS_UNBINDABLE,
    "runbindable": sc.MS_UNBINDABLE | sc.MS_REC,
}

_UNSUPPORTED = {"tmpcopyup", "idmap", "ridmap", "rro", "rrw", "rnosuid", "rsuid", "rnodev"}
_ATIME_FLAGS = sc.MS_NOATIME | sc.MS_RELATIME | sc.MS_STRICTATIME
# statvfs f_flag bits (ST_*) -> MS_* flags; they differ only for relatime.
_ST_TO_MS = {
    1: sc.MS_RDONLY,
    2: sc.MS_NOSUID,
    4: sc.MS_NODEV,
    8: sc.MS_NOEXEC,
    1024: sc.MS_NOATIME,
    2048: sc.MS_NODIRATIME,
    4096: sc.MS_RELATIME,
}

#: Devices every container gets: (path, type, major, minor).
DEFAULT_DEVICES: tuple[tuple[str, str, int, int], ...] = (
    ("/dev/null", "c", 1, 3),
    ("/dev/zero", "c", 1, 5),
    ("/dev/full", "c", 1, 7),
    ("/dev/random", "c", 1, 8),
    ("/dev/urandom", "c", 1, 9),
    ("/dev/tty", "c", 5, 0),
)

_DEV_TMPFS = {
    "destination": "/dev",
    "type": "tmpfs",
    "source": "tmpfs",
    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
}


#: /proc/self/mountinfo as prepare_rootfs found it (the init runs it once).
_host_mounts: list[dict[str, str]] | None = None


class MountOptions:
    """An OCI ``mounts[].options`` list split into what mount(2) takes."""

    __slots__ = ("clear", "data", "flags", "propagation")

    def __init__(self) -> None:
        self.flags = 0
        #: flags explicitly turned off (``rw``, ``dev``...), so a remount keeps them off.
        self.clear = 0
        self.propagation: list[int] = []
        #: filesystem-specific options (``mode=755``, ``newinstance``...), comma-joined.
        self.data: list[str] = []

    @property
    def bind(self) -> bool:
        return bool(self.flags & sc.MS_BIND)

    @property
    def data_str(self) -> str | None:
        return ",".join(self.data) or None

    def __repr__(self) -> str:
        return (
            f"MountOptions(flags={self.flags:#x}, clear={self.clear:#x}, "
            f"propagation={self.propagation}, data={self.data})"
        )


def parse_mount_options(options: list[str] | None) -> MountOptions:
    """Split OCI mount options into flags, propagation changes and filesystem data."""
    parsed = MountOptions()
    for raw in options or []:
        opt = raw.strip()
        if not opt:
            continue
        if opt in _FLAG_OPTIONS:
            clear, flag = _FLAG_OPTIONS[opt]
            if clear:
                parsed.flags &= ~flag
                parsed.clear |= flag
            else:
                parsed.flags |= flag
                parsed.clear &= ~flag
        elif opt in PROPAGATION:
            parsed.propagation.append(PROPAGATION[opt])
        elif opt in _UNSUPPORTED:
            raise InvalidConfig(
                f"mount option {opt!r} is not supported by vz-runtime",
                "remove it from the mount's options",
            )
        else:
            parsed.data.append(opt)
    return parsed


# -- path resolution -----------------------------------------------------------------------


def resolve_in_root(root: str | os.PathLike[str], path: str) -> str:
    """Resolve ``path`` as the container will see it, returning a host path under ``root``.

    Symlinks are followed with ``root`` as ``/``: absolute targets restart at ``root`` and
    ``..`` never climbs above it, so a link such as ``etc -> /etc`` or ``../../..`` cannot
    reach the host. Components that do not exist are kept as written.
    """
    base = os.path.abspath(root)
    try:
        return os.resolve(base, path, strict=True)
    except OSError as exc:
        raise SyscallError("resolve", exc.errno or errno.EIO, f"{path} in {base}") from None


def _within(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _check_inside(root: str, fd: int, shown: str) -> None:
    real = os.readlink(_fd_path(fd))
    if not _within(root, real):
        raise InvalidConfig(
            f"mount destination {shown} resolves to {real}, outside the rootfs {root}",
            "the image contains a symlink that points out of the rootfs; fix the image",
        )


def mount_in_root(
    root: str,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    """mount(2) onto ``target`` (already resolved under ``root``) through an O_PATH fd
    checked to lie inside ``root``, so a symlink swapped in meanwhile cannot redirect it."""
    try:
        fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SyscallError("open", exc.errno or errno.EIO, target) from None
    try:
        _check_inside(root, fd, target)
        try:
            sc.mount(source, _fd_path(fd), fstype, flags, data)
        except SyscallError as exc:
            # Name the real path, not /proc/self/fd/N.
            what = source or fstype or "none"
            raise SyscallError("mount", exc.errno, f"{what} on {target}") from None
    finally:
        os.close(fd)


# -- mount points --------------------------------------------------------------------------


def _makedirs_in_root(root: str, target: str) -> None:
    rel = os.path.relpath(target, root)
    current = root
    for name in rel.split("/"):
        if name in ("", "."):
            continue
        current = os.path.join(current, name)
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if os.path.islink(current) or not os.path.isdir(current):
                raise SyscallError("mkdir", errno.ENOTDIR, current) from None
        except OSError as exc:
            raise SyscallError("mkdir", exc.errno or errno.EIO, current) from None


def create_mount_point(root: str, target: str, *, is_file: bool) -> None:
    """Create ``target`` (a resolved path under ``root``): a directory, or an empty file
    when a file is to be bind-mounted there. An existing entry is kept."""
    if is_file:
        _makedirs_in_root(root, os.path.dirname(target))
        if not os.path.lexists(target):
            try:
                fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SyscallError("open", exc.errno or errno.EIO, target) from None
            os.close(fd)
    else:
        _makedirs_in_root(root, target)


# -- remounts ------------------------------------------------------------------------------


def _current_flags(path: str | os.PathLike[str]) -> int:
    st_flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS.items() if st_flags & st)


def remount_bind(path: str | os.PathLike[str], flags: int, clear: int = 0) -> None:
    """Change the per-mount flags of the bind mount at ``path``.

    In a user namespace the kernel refuses to drop flags that were locked by the parent
    (nosuid, nodev, noexec, ro, the atime mode); on EPERM retry keeping those the mount
    already has, unless asked to clear them, as runc does.
    """
    want = (flags | sc.MS_BIND | sc.MS_REMOUNT) & ~sc.MS_REC
    try:
        sc.mount(None, path, None, want, None)
        return
    except SyscallError as exc:
        if exc.errno != errno.EPERM:
            raise
        first = exc
    current = _current_flags(path)
    keep = current & (sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RDONLY) & ~clear
    if not want & _ATIME_FLAGS:
        keep |= current & (_ATIME_FLAGS | sc.MS_NODIRATIME)
    try:
        sc.mount(None, path, None, want | keep, None)
    except SyscallError:
        raise first from None


# -- mountinfo and cgroups -----------------------------------------------------------------


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def read_mountinfo(text: str | None = None) -> list[dict[str, str]]:
    """Parse /proc/self/mountinfo: root, mountpoint, options, optional, fstype, source,
    super (super options) per line."""
    if text is None:
        with open("/proc/self/mountinfo") as f:
            text = f.read()
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 6 or len(rfields) < 2:
            continue
        out.append(
            {
                "root": _unescape(fields[3]),
                "mountpoint": _unescape(fields[4]),
                "options": fields[5],
                "optional": " ".join(fields[6:]),
                "fstype": rfields[0],
                "source": _unescape(rfields[1]),
                "super": rfields[2] if len(rfields) > 2 else "",
            }
        )
    return out


def _own_cgroups() -> dict[str, str]:
    """controller (or ``name=x``, or ``""`` for v2) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _hid, controllers, path = line.rstrip("\n").split(":", 2)
            if not controllers:
                paths[""] = path
            for ctl in controllers.split(","):
                if ctl:
                    paths[ctl] = path
    return paths


def _mount_cgroup(root: str, target: str, opts: MountOptions) -> None:
    hierarchy = "/sys/fs/cgroup"
    # The host's hierarchies, as prepare_rootfs read them before mounting anything.
    infos = _host_mounts or read_mountinfo()
    top = [i for i in infos if i["mountpoint"] == hierarchy]
    flags = opts.flags & ~sc.MS_BIND
    if top and top[-1]["fstype"] == "cgroup2":
        mount_in_root(root, "cgroup2", target, "cgroup2", flags & ~sc.MS_REC)
        return
    own = _own_cgroups()
    mount_in_root(
        root, "tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "mode=755"
    )
    for info in infos:
        mp = info["mountpoint"]
        if info["fstype"] not in ("cgroup", "cgroup2") or os.path.dirname(mp) != hierarchy:
            continue
        keys = [""] if info["fstype"] == "cgroup2" else info["super"].split(",")
        sub = os.path.join(target, os.path.basename(mp))
        if info["root"].startswith("/.."):
            # We are in a cgroup namespace whose root (the container's cgroup) lies below
            # this mount's: a fresh mount of the hierarchy starts at our own cgroup.
            os.makedirs(sub, exist_ok=True)
            data = (
                None
                if info["fstype"] == "cgroup2"
                else ",".join(k for k in keys if k not in ("rw", "ro"))
            )
            mount_in_root(
                root, info["fstype"], sub, info["fstype"],
                (flags & sc.MS_RDONLY) | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, data,
            )  # fmt: skip
            continue
        path = next((own[k] for k in keys if k in own), None)
        if path is None or not _within(info["root"], path):
            continue
        src = os.path.normpath(os.path.join(mp, os.path.relpath(path, info["root"])))
        if not os.path.isdir(src):
            # Never fall back to the hierarchy's top: that would show the host's tree.
            continue
        os.makedirs(sub, exist_ok=True)
        mount_in_root(root, src, sub, None, sc.MS_BIND)
        remount_bind(sub, flags | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, opts.clear)
    # Co-mounted controllers (cpu -> cpu,cpuacct) are symlinks on the host; mirror them.
    with os.scandir(hierarchy) as entries:
        for entry in entries:
            link = os.path.join(target, entry.name)
            if entry.is_symlink() and not os.path.lexists(link):
                os.symlink(os.readlink(entry.path), link)
    if flags & sc.MS_RDONLY:
        sc.mount(None, target, None, sc.MS_REMOUNT | sc.MS_RDONLY | _current_flags(target))


# -- one mounts[] entry --------------------------------------------------------------------


def mount_entry(root: str, entry: dict[str, Any], *, in_userns: bool) -> None:
    """Perform one OCI ``mounts[]`` entry under ``root`` (before pivot_root)."""
    dest = entry.get("destination")
    if not isinstance(dest, str) or not dest:
        raise InvalidConfig(
            f"mount entry without a destination: {entry!r}",
            'every mounts[] entry needs "destination": "/absolute/path"',
        )
    opts = parse_mount_options(entry.get("options"))
    fstype = entry.get("type") or ("bind" if opts.bind else "none")
    source = entry.get("source") or fstype
    is_bind = fstype == "bind" or opts.bind
    target = resolve_in_root(root, dest)

    if is_bind:
        if not os.path.exists(source):
            raise SyscallError("mount", errno.ENOENT, f"{source} on {dest}")
        create_mount_point(root, target, is_file=not os.path.isdir(source))
        mount_in_root(root, source, target, None, sc.MS_BIND | (opts.flags & sc.MS_REC))
        if opts.flags & ~(sc.MS_BIND | sc.MS_REC | sc.MS_REMOUNT):
            remount_bind(target, opts.flags, opts.clear)
    else:
        create_mount_point(root, target, is_file=False)
        flags = opts.flags
        if os.path.normpath(dest) == "/dev":
            # Devices are created after this; /dev becomes read-only in finalize.
            flags &= ~sc.MS_RDONLY
        if fstype == "cgroup":
            _mount_cgroup(root, target, opts)
        else:
            _mount_fs(root, source, target, fstype, flags, opts, in_userns=in_userns)

    for prop in opts.propagation:
        sc.mount(None, target, None, prop, None)


def _mount_fs(
    root: str,
    source: str,
    target: str,
    fstype: str,
    flags: int,
    opts: MountOptions,
    *,
    in_userns: bool,
) -> None:
    try:
        mount_in_root(root, source, target, fstype, flags, opts.data_str)
        return
    except SyscallError as exc:
        # sysfs needs a network namespace and mqueue an IPC namespace owned by the user
        # namespace; without them runc binds the host's instead, and so do we.
        fallback = {"sysfs": "/sys", "mqueue": "/dev/mqueue"}.get(fstype)
        if not (in_userns and fallback and exc.errno in (errno.EPERM, errno.EINVAL)):
            raise
    mount_in_root(root, fallback, target, None, sc.MS_BIND | sc.MS_REC)
    remount_bind(target, flags, opts.clear)


# -- /dev ----------------------------------------------------------------------------------


def _device_list(spec_devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    given = {d.get("path") for d in spec_devices}
    defaults = [
        {"path": p, "type": t, "major": ma, "minor": mi, "fileMode": 0o666, "uid": 0, "gid": 0}
        for p, t, ma, mi in DEFAULT_DEVICES
        if p not in given
    ]
    return defaults + list(spec_devices)


def create_device(root: str, dev: dict[str, Any], *, in_userns: bool) -> None:
    """Create one device node under ``root``: mknod, or in a user namespace (where mknod
    is not allowed) a bind mount of the host's node at the same path onto an empty file."""
    path = dev.get("path")
    kind = dev.get("type")
    if not isinstance(path, str) or kind not in ("c", "b", "u", "p"):
        raise InvalidConfig(
            f"invalid linux.devices entry {dev!r}",
            'each device needs "path" and "type" (c, b, u or p), plus major/minor',
        )
    target = resolve_in_root(root, path)
    if not _within(root, os.path.dirname(target)):
        raise InvalidConfig(f"device path {path} escapes the rootfs", "use a path under /dev")
    _makedirs_in_root(root, os.path.dirname(target))
    if os.path.lexists(target) and not os.path.isdir(target):
        os.unlink(target)
    if in_userns:
        create_mount_point(root, target, is_file=True)
        mount_in_root(root, path, target, None, sc.MS_BIND)
        return
    mode = int(dev.get("fileMode", 0o666)) & 0o7777
    if kind == "p":
        fmt, rdev = stat.S_IFIFO, 0
    else:
        fmt = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
        rdev = os.makedev(int(dev.get("major", 0)), int(dev.get("minor", 0)))
    try:
        os.mknod(target, fmt | mode, rdev)
        os.chmod(target, mode)  # mknod honours the umask; the spec's mode must not.
        os.chown(target, int(dev.get("uid", 0)), int(dev.get("gid", 0)))
    except OSError as exc:
        raise SyscallError("mknod", exc.errno or errno.EIO, target) from None


def setup_dev(root: str, spec_devices: list[dict[str, Any]], *, in_userns: bool) -> None:
    """Default devices, ``linux.devices`` and the standard /dev symlinks, under ``root``."""
    for dev in _device_list(spec_devices):
        create_device(root, dev, in_userns=in_userns)
    dev_dir = resolve_in_root(root, "/dev")
    links = [
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ]
    if os.path.exists("/proc/kcore"):
        links.append(("/proc/kcore", "core"))
    for src, name in links:
        try:
            os.symlink(src, os.path.join(dev_dir, name))
        except FileExistsError:
            pass
    ptmx = os.path.join(dev_dir, "ptmx")
    if os.path.lexists(ptmx):
        os.unlink(ptmx)
    os.symlink("pts/ptmx", ptmx)


# -- pivot and finalize --------------------------------------------------------------------


def make_parent_private(root: str, infos: list[dict[str, str]] | None = None) -> None:
    """pivot_root fails if the new root's parent mount is shared; make it private."""
    best: dict[str, str] | None = None
    for info in infos if infos is not None else read_mountinfo():
        mp = info["mountpoint"]
        if _within(mp, root) and (best is None or len(mp) >= len(best["mountpoint"])):
            best = info
    if best is not None and "shared:" in best["optional"]:
        sc.mount(None, best["mountpoint"], None, sc.MS_PRIVATE, None)


def pivot_into(root: str) -> None:
    """pivot_root(".", ".") in ``root`` and detach the old root stacked on top (runc's
    trick: no put_old directory needed, works on a read-only rootfs)."""
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        new = os.open(root, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchdir(new)
            sc.pivot_root(".", ".")
        finally:
            os.close(new)
        os.fchdir(old)
        # Make the old root a slave first so the unmount cannot propagate to the host.
        sc.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC, None)
        sc.umount2(".", sc.MNT_DETACH)
    finally:
        os.close(old)
    os.chdir("/")


def mask_paths(paths: list[str]) -> None:
    """Hide ``paths`` (after pivot): /dev/null over files, a read-only tmpfs over
    directories; missing paths are skipped."""
    for path in paths:
        # Most listed paths do not exist on a given kernel: a stat is cheaper than the
        # failed mount and its exception.
        if not os.path.lexists(path):
            continue
        try:
            sc.mount("/dev/null", path, None, sc.MS_BIND, None)
        except SyscallError as exc:
            if exc.errno == errno.ENOENT:
                continue
            if exc.errno != errno.ENOTDIR:
                raise
            sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY, None)


def readonly_paths(paths: list[str]) -> None:
    """Make ``paths`` read-only (after pivot) with a bind and a read-only remount;
    missing paths are skipped."""
    for path in paths:
        if not os.path.lexists(path):
            continue
        try:
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC, None)
        except SyscallError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise
        remount_bind(path, sc.MS_RDONLY)


def mount_console(slave: str) -> None:
    """Bind the pty slave ``slave`` (a path valid in the container, e.g. /dev/pts/0)
    onto /dev/console. Call after prepare_rootfs when process.terminal is true."""
    if not os.path.lexists("/dev/console"):
        os.close(os.open("/dev/console", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    sc.mount(slave, "/dev/console", None, sc.MS_BIND, None)


def apply_sysctls(sysctl: dict[str, Any]) -> None:
    """Write linux.sysctl entries through the container's own /proc/sys."""
    for key, value in sysctl.items():
        path = "/proc/sys/" + str(key).replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise InvalidConfig(
                f"sysctl {key}={value}: {exc.strerror} ({path})",
                "only namespaced sysctls (net.*, kernel.shm*, kernel.msg*, fs.mqueue.*) "
                "can be set in a container",
            ) from None


def prepare_rootfs(
    rootfs: str | Path,
    spec: dict[str, Any],
    *,
    in_userns: bool,
    before_pivot: Callable[[], None] | None = None,
) -> None:
    """Build the container's filesystem view and pivot into it.

    ``spec`` is the whole config.json dict (uses ``root``, ``mounts``, ``linux.*``).
    Must run in a new mount namespace (after unshare(CLONE_NEWNS)), and in the new pid
    namespace if /proc is mounted. On return the cwd is ``/`` of the container, masked
    and read-only paths are applied, and ``/`` is read-only if ``root.readonly``.
    ``in_userns``: devices are bind-mounted from the host instead of mknod'ed.
    Raises InvalidConfig for a bad spec, SyscallError naming the syscall and path.
    """
    linux = spec.get("linux") or {}
    mounts: list[dict[str, Any]] = list(spec.get("mounts") or [])
    root = os.path.realpath(rootfs)
    if not os.path.isdir(root):
        raise InvalidConfig(
            f"root.path {rootfs} is not a directory",
            "point root.path at an unpacked root filesystem",
        )

    propagation = linux.get("rootfsPropagation") or "rslave"
    if propagation not in PROPAGATION:
        raise InvalidConfig(
            f"invalid linux.rootfsPropagation {propagation!r}",
            "use one of: " + ", ".join(PROPAGATION),
        )
    sc.mount(None, "/", None, PROPAGATION[propagation], None)
    global _host_mounts
    _host_mounts = read_mountinfo()  # parsed once: cgroup mounts need it again
    make_parent_private(root, _host_mounts)
    sc.mount(root, root, "bind", sc.MS_BIND | sc.MS_REC, None)

    dev_mounts = [m for m in mounts if os.path.normpath(str(m.get("destination", ""))) == "/dev"]
    if not dev_mounts:
        mounts.insert(0, _DEV_TMPFS)
        dev_mounts = [_DEV_TMPFS]
    dev = dev_mounts[-1]
    dev_opts = parse_mount_options(dev.get("options"))
    dev_is_bind = dev.get("type") == "bind" or dev_opts.bind

    for entry in mounts:
        mount_entry(root, entry, in_userns=in_userns)
    if not dev_is_bind:
        setup_dev(root, linux.get("devices") or [], in_userns=in_userns)

    if before_pivot is not None:
        # createContainer hooks: in the container's namespaces, before pivot_root.
        before_pivot()
    pivot_into(root)
    if linux.get("rootfsPropagation"):
        # Applied again to the new "/" so shared/slave roots behave as asked after pivot.
        sc.mount(None, "/", None, PROPAGATION[propagation], None)

    # Before readonlyPaths makes /proc/sys read-only (runc's order).
    apply_sysctls(linux.get("sysctl") or {})
    mask_paths(linux.get("maskedPaths") or [])
    readonly_paths(linux.get("readonlyPaths") or [])
    if not dev_is_bind and dev_opts.flags & sc.MS_RDONLY:
        sc.mount(None, "/dev", None, sc.MS_REMOUNT | sc.MS_RDONLY | _current_flags("/dev"), None)
    if (spec.get("root") or {}).get("readonly"):
        remount_bind("/", sc.MS_RDONLY)
