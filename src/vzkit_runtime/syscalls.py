"""Thin wrappers over the syscalls the container runtime needs, through libc.

``vz-runtime`` must start about as fast as runc: the C calls go through ffi.py (the part
of ctypes needed, without ctypes' import cost), and libc is loaded on first use.

Every wrapper raises :class:`SyscallError` naming the syscall and the path (or argument)
it acted on, with a hint chosen from the errno, so a failure deep in container set-up
reads like ``mount(proc on /proc): Operation not permitted``.
"""

from __future__ import annotations

import errno as _errno

from vzkit_runtime import _os as os
from vzkit_runtime import ffi
from vzkit_runtime.errors import EngineError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from typing import Any

# -- namespaces ----------------------------------------------------------------------------

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: OCI ``linux.namespaces[].type`` -> CLONE_NEW* flag.
NAMESPACES: dict[str, int] = {
    "pid": CLONE_NEWPID,
    "network": CLONE_NEWNET,
    "mount": CLONE_NEWNS,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "user": CLONE_NEWUSER,
    "cgroup": CLONE_NEWCGROUP,
    "time": CLONE_NEWTIME,
}

#: OCI ``linux.namespaces[].type`` -> file name under ``/proc/PID/ns/``.
NAMESPACE_FILES: dict[str, str] = {
    "pid": "pid",
    "network": "net",
    "mount": "mnt",
    "ipc": "ipc",
    "uts": "uts",
    "user": "user",
    "cgroup": "cgroup",
    "time": "time",
}

# -- mount flags (<linux/mount.h>) ---------------------------------------------------------

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_POSIXACL = 0x10000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_I_VERSION = 0x800000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000

MNT_FORCE = 0x1
MNT_DETACH = 0x2
MNT_EXPIRE = 0x4
UMOUNT_NOFOLLOW = 0x8

# -- the new mount API (<linux/mount.h>, <linux/fcntl.h>) ---------------------------------

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# -- prctl (<linux/prctl.h>) ---------------------------------------------------------------

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_KEEPCAPS = 7
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# pivot_root and seccomp have no glibc wrapper; numbers from the kernel's syscall tables.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "i686": 217, "i386": 217}
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "i686": 354, "i386": 354}
# Added after the syscall tables were unified (5.1+): one number on every architecture.
_SYS_OPEN_TREE = {"x86_64": 428, "aarch64": 428, "i686": 428, "i386": 428}
_SYS_MOVE_MOUNT = {"x86_64": 429, "aarch64": 429, "i686": 429, "i386": 429}
_SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442, "i686": 442, "i386": 442}
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1
#: OCI linux.seccomp.flags -> seccomp(2) SECCOMP_FILTER_FLAG_* bits.
SECCOMP_FILTER_FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}


# -- errors --------------------------------------------------------------------------------

_HINTS: dict[int, str] = {
    _errno.EPERM: "needs root / CAP_SYS_ADMIN, or the user namespace lacks the mapping",
    _errno.EACCES: "permission denied: check the path's permissions and any LSM "
    "(AppArmor/SELinux) policy, and that the uid/gid is mapped in the user namespace",
    _errno.ENOENT: "the path does not exist in the rootfs",
    _errno.ENOTDIR: "a component of the path is not a directory "
    "(a file cannot be mounted over a directory or the reverse)",
    _errno.EINVAL: "invalid argument: check the flags and options; for pivot_root the new "
    "root must be a mount point not on a shared mount or on rootfs/initramfs",
    _errno.EBUSY: "the target is busy or already mounted; is something still using it?",
    _errno.ENODEV: "the kernel does not support this filesystem type (is the module loaded?)",
    _errno.ENOSYS: "the running kernel does not implement this syscall",
    _errno.EROFS: "the filesystem is mounted read-only",
    _errno.ELOOP: "too many levels of symbolic links in the path",
    _errno.ENOSPC: "no space left, or a namespace/keyring limit was reached "
    "(see /proc/sys/user/max_*_namespaces)",
    _errno.EUSERS: "too many nested user namespaces",
    _errno.EBADF: "the file descriptor is not open or not a namespace file",
    _errno.EEXIST: "the path already exists",
}


def hint_for_errno(err: int, syscall: str = "") -> str:
    """A one-line suggestion for ``err`` raised by ``syscall``."""
    if syscall == "setns" and err == _errno.EINVAL:
        return "the fd does not refer to a namespace of the requested type"
    if syscall == "unshare" and err == _errno.EINVAL:
        return "the kernel does not support one of the requested namespaces"
    if syscall == "seccomp_load" and err in (_errno.EACCES, _errno.EPERM):
        return (
            "loading a filter without no_new_privs needs CAP_SYS_ADMIN: set "
            "process.noNewPrivileges, or load it before capabilities are dropped"
        )
    if syscall in ("open_tree", "move_mount", "mount_setattr") and err == _errno.ENOSYS:
        return "the new mount API needs Linux 5.2 or later (mount_setattr: 5.12)"
    if syscall == "move_mount" and err == _errno.EINVAL:
        return "a directory mounts only on a directory and a file only on a file"
    if syscall in ("capset", "prctl") and err == _errno.EPERM:
        return "the process lacks CAP_SETPCAP or the capability is outside its bounding set"
    return _HINTS.get(err, "see the errno for this syscall in its man page")


class SyscallError(EngineError):
    """A syscall failed; carries the syscall name, the errno and the path it acted on."""

    code = "syscall_error"

    def __init__(self, syscall: str, err: int, path: str | None = None) -> None:
        target = f"({path})" if path is not None else "()"
        super().__init__(
            f"{syscall}{target}: {os.strerror(err)}",
            hint_for_errno(err, syscall),
            syscall=syscall,
            errno=err,
            path=path,
        )
        self.syscall = syscall
        self.errno = err
        self.path = path


# -- libc ----------------------------------------------------------------------------------


class Libc:
    """libc's functions the runtime calls (errno captured)."""

    def __init__(self) -> None:
        lib = ffi.Library("libc.so.6")
        path, num, size = ffi.c_char_p, ffi.c_int, ffi.c_size_t
        self.mount = lib.function("mount", (path, path, path, ffi.c_ulong, path))
        self.umount2 = lib.function("umount2", (path, num))
        self.unshare = lib.function("unshare", (num,))
        self.setns = lib.function("setns", (num, num))
        self.sethostname = lib.function("sethostname", (path, size))
        self.setdomainname = lib.function("setdomainname", (path, size))
        self.prctl = lib.function("prctl", (num,) + (ffi.c_ulong,) * 4)
        # Buffers (struct pointers) and the variadic syscall(2): arguments as given.
        self.setrlimit = lib.function("setrlimit")
        self.getrlimit = lib.function("getrlimit")
        self.capget = lib.function("capget")
        self.capset = lib.function("capset")
        self.syscall = lib.function("syscall", None, ffi.c_long)


_libc: Libc | None = None


def libc() -> Libc:
    """The process's libc, loaded on first use."""
    global _libc
    if _libc is None:
        _libc = Libc()
    return _libc


def _check(ret: int, syscall: str, path: str | None = None) -> int:
    if ret < 0:
        raise SyscallError(syscall, ffi.get_errno(), path)
    return ret


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _flag_names(flags: int) -> str:
    names = [name for name, bit in NAMESPACES.items() if flags & bit]
    rest = flags & ~sum(NAMESPACES.values())
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


# -- wrappers ------------------------------------------------------------------------------


def unshare(flags: int) -> None:
    """unshare(2): move the calling thread into new namespaces (CLONE_NEW* flags)."""
    _check(libc().unshare(flags), "unshare", _flag_names(flags))


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace open at ``fd`` (0 = any type)."""
    _check(libc().setns(fd, nstype), "setns", f"fd {fd}, {_flag_names(nstype)}")


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2). The error names source, type and target, e.g. ``mount(proc on /proc)``."""
    ret = libc().mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    if ret < 0:
        what = os.fspath(source) if source else (fstype or "none")
        raise SyscallError("mount", ffi.get_errno(), f"{what} on {os.fspath(target)}")


def umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2)."""
    _check(libc().umount2(_b(target), flags), "umount2", os.fspath(target))


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    """pivot_root(2) through syscall(2): glibc has no wrapper."""
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise SyscallError("pivot_root", _errno.ENOSYS, os.fspath(new_root))
    ret = libc().syscall(ffi.c_long(nr), _b(new_root), _b(put_old))
    _check(ret, "pivot_root", f"{os.fspath(new_root)}, {os.fspath(put_old)}")


def _nr(table: dict[str, int], syscall: str, path: str) -> int:
    nr = table.get(os.uname().machine)
    if nr is None:
        raise SyscallError(syscall, _errno.ENOSYS, path)
    return nr


def open_tree(dirfd: int, path: str | os.PathLike[str], flags: int) -> int:
    """open_tree(2): with OPEN_TREE_CLONE, a detached copy of the mount (tree, with
    AT_RECURSIVE) at ``path``, as an fd for move_mount. Returns the fd."""
    shown = os.fspath(path)
    nr = _nr(_SYS_OPEN_TREE, "open_tree", shown)
    ret = libc().syscall(ffi.c_long(nr), ffi.c_int(dirfd), _b(path), ffi.c_uint(flags))
    return _check(ret, "open_tree", shown)


def move_mount(
    from_dirfd: int,
    from_path: str | os.PathLike[str],
    to_dirfd: int,
    to_path: str | os.PathLike[str],
    flags: int,
) -> None:
    """move_mount(2), e.g. attach an open_tree fd (MOVE_MOUNT_F_EMPTY_PATH) at ``to_path``."""
    shown = os.fspath(to_path)
    nr = _nr(_SYS_MOVE_MOUNT, "move_mount", shown)
    ret = libc().syscall(
        ffi.c_long(nr),
        ffi.c_int(from_dirfd),
        _b(from_path),
        ffi.c_int(to_dirfd),
        _b(to_path),
        ffi.c_uint(flags),
    )
    _check(ret, "move_mount", shown)


def mount_setattr(
    dirfd: int,
    path: str | os.PathLike[str],
    flags: int,
    *,
    attr_set: int = 0,
    attr_clr: int = 0,
    propagation: int = 0,
    shown: str | None = None,
) -> None:
    """mount_setattr(2): MOUNT_ATTR_* bits and/or a propagation type (MS_PRIVATE...) on
    the mount at ``dirfd``/``path`` (AT_EMPTY_PATH: the fd itself; AT_RECURSIVE: and
    every mount under it). ``shown`` names the mount in errors."""
    shown = shown if shown is not None else (os.fspath(path) or f"fd {dirfd}")
    nr = _nr(_SYS_MOUNT_SETATTR, "mount_setattr", shown)
    # struct mount_attr {u64 attr_set, attr_clr, propagation, userns_fd}
    attr = b"".join(v.to_bytes(8, "little") for v in (attr_set, attr_clr, propagation, 0))
    ret = libc().syscall(
        ffi.c_long(nr),
        ffi.c_int(dirfd),
        _b(path),
        ffi.c_uint(flags),
        ffi.buffer(attr),
        ffi.c_size_t(len(attr)),
    )
    _check(ret, "mount_setattr", shown)


def sethostname(name: str) -> None:
    """sethostname(2) in the current UTS namespace."""
    raw = name.encode()
    _check(libc().sethostname(raw, len(raw)), "sethostname", name)


def setdomainname(name: str) -> None:
    """setdomainname(2) in the current UTS namespace."""
    raw = name.encode()
    _check(libc().setdomainname(raw, len(raw)), "setdomainname", name)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); returns the call's non-negative result."""
    ret: int = libc().prctl(option, arg2, arg3, arg4, arg5)
    return _check(ret, "prctl", f"option {option}, {arg2}")


#: OCI process.rlimits types -> resource numbers (the generic Linux ones: x86, arm).
RLIMITS = {
    f"RLIMIT_{name}": i
    for i, name in enumerate(
        ("CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK", "AS",
         "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME")
    )
}  # fmt: skip
RLIM_INFINITY = 2**64 - 1


def setrlimit(resource: int, soft: int, hard: int, name: str) -> None:
    """setrlimit(2); limits of 2**63 and above are infinity (OCI writes 2**64-1)."""
    limits = b"".join(min(v, RLIM_INFINITY).to_bytes(8, "little") for v in (soft, hard))
    _check(libc().setrlimit(ffi.c_int(resource), ffi.buffer(limits)), "setrlimit", name)


def getrlimit(resource: int) -> tuple[int, int]:
    buf = ffi.buffer(16)
    _check(libc().getrlimit(ffi.c_int(resource), buf), "getrlimit", str(resource))
    raw = buf.raw
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def _cap_header(pid: int) -> Any:
    # struct __user_cap_header_struct {u32 version; int pid}
    return ffi.buffer(_LINUX_CAPABILITY_VERSION_3.to_bytes(4, "little") + _u32(pid))


def capget(pid: int = 0) -> tuple[int, int, int]:
    """capget(2): (effective, permitted, inheritable) as 64-bit masks."""
    data = ffi.buffer(24)  # struct __user_cap_data_struct[2] {u32 eff, prm, inh}
    _check(libc().capget(_cap_header(pid), data), "capget", f"pid {pid}")
    words = [int.from_bytes(data.raw[i : i + 4], "little") for i in range(0, 24, 4)]
    return tuple(words[k] | (words[k + 3] << 32) for k in range(3))  # type: ignore[return-value]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) on the calling thread with 64-bit masks."""
    data = b"".join(
        _u32((mask >> shift) & 0xFFFFFFFF)
        for shift in (0, 32)
        for mask in (effective, permitted, inheritable)
    )
    _check(
        libc().capset(_cap_header(0), ffi.buffer(data)),
        "capset",
        f"eff={effective:#x} prm={permitted:#x} inh={inheritable:#x}",
    )


def seccomp_filter(program: bytes, flags: int = 0) -> None:
    """Install a classic-BPF seccomp program (struct sock_filter array, e.g. from
    libseccomp's seccomp_export_bpf) on the calling thread: seccomp(2) with ``flags``
    (SECCOMP_FILTER_FLAG_*), or prctl(PR_SET_SECCOMP) where no flags are needed."""
    buf = ffi.buffer(program)
    # struct sock_fprog {unsigned short len; (padding) struct sock_filter *filter}
    fprog = (len(program) // 8).to_bytes(8, "little") + ffi.addressof(buf).to_bytes(8, "little")
    prog = ffi.buffer(fprog)
    nr = _SYS_SECCOMP.get(os.uname().machine)
    if nr is not None:
        ret = libc().syscall(
            ffi.c_long(nr),
            ffi.c_uint(SECCOMP_SET_MODE_FILTER),
            ffi.c_uint(flags),
            prog,
        )
    elif not flags:
        ret = libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ffi.addressof(prog), 0, 0)
    else:
        raise SyscallError("seccomp", _errno.ENOSYS, "filter")
    _check(ret, "seccomp_load", f"filter of {len(program) // 8} instructions")


# -- bpf (<linux/bpf.h>): cgroup device programs ------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "i686": 357, "i386": 357}
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
_BPF_LOG_SIZE = 65536


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    nr = _nr(_SYS_BPF, "bpf", what)
    ret = libc().syscall(ffi.c_long(nr), ffi.c_int(cmd), ffi.buffer(attr), ffi.c_uint(len(attr)))
    return _check(ret, "bpf", what)


def bpf_prog_load(prog_type: int, code: bytes, what: str) -> int:
    """bpf(BPF_PROG_LOAD) of ``code`` (struct bpf_insn array); the program's fd. If the
    verifier refuses it, the error carries the verifier's log."""
    insns = ffi.buffer(code)
    license = ffi.buffer(b"GPL\0")

    def attr(log: Any) -> bytes:
        # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
        # log_size, log_buf, kern_version, prog_flags, prog_name[16].
        return (
            _u32(prog_type)
            + _u32(len(code) // 8)
            + ffi.addressof(insns).to_bytes(8, "little")
            + ffi.addressof(license).to_bytes(8, "little")
            + _u32(1 if log is not None else 0)
            + _u32(len(log) if log is not None else 0)
            + (ffi.addressof(log) if log is not None else 0).to_bytes(8, "little")
            + _u32(0)
            + _u32(0)
            + b"vz_devices".ljust(16, b"\0")
        )

    try:
        return _bpf(BPF_PROG_LOAD, attr(None), what)
    except SyscallError as exc:
        if exc.errno != _errno.EINVAL and exc.errno != _errno.EACCES:
            raise
        log = ffi.buffer(_BPF_LOG_SIZE)
        try:
            return _bpf(BPF_PROG_LOAD, attr(log), what)
        except SyscallError as again:
            again.message += ": " + log.value.decode(errors="replace").strip()[-500:]
            raise again from None


def bpf_prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    """bpf(BPF_PROG_ATTACH): attach program ``prog_fd`` to the cgroup open at ``target_fd``."""
    attr = _u32(target_fd) + _u32(prog_fd) + _u32(attach_type) + _u32(flags) + _u32(0)
    _bpf(BPF_PROG_ATTACH, attr, f"attach program to cgroup fd {target_fd}")
