"""Seccomp filters from an OCI ``linux.seccomp`` object, compiled by libseccomp via ctypes.

libseccomp (libseccomp.so.2) is loaded on first use; only stdlib + ctypes are imported,
because this runs in ``vz-runtime``'s container init.

Semantics follow runc: syscall names the library does not know are skipped, rules whose
action equals the default action are skipped (libseccomp refuses them), several
comparisons on the same argument become separate rules (libseccomp cannot AND them, so
they are ORed, as in runc), and no_new_privs is left to the caller
(``process.noNewPrivileges``), so libseccomp's own NNP attribute is turned off.

The default profile (:func:`default_profile`) is a deny-list: defaultAction ALLOW with
EPERM for the syscalls that widen the kernel attack surface or escape the container.
Why not Docker's allow-list (defaultAction ERRNO, ~370 names with per-capability and
per-kernel-version conditions)? Copied by hand it goes stale or drifts silently and the
failure mode is a workload breaking with a bare EPERM far from the cause; a deny-list
stays short enough to review line by line and cannot break an ordinary program (busybox,
coreutils, python3 are tested against it). Its cost is that syscalls added by future
kernels are allowed until listed; most dangerous ones also need capabilities the
container does not have, so seccomp is defence in depth here, not the only barrier.
Newer families that are risky without capabilities are listed already (io_uring, the
new mount API, pidfd_getfd, process_madvise), and clone3 answers ENOSYS (its flags live
in memory seccomp cannot read) so libc falls back to clone, whose flags are checked.
"""

from __future__ import annotations

import ctypes
import errno

from vzkit_runtime import _os as os
from vzkit_runtime.errors import HostUnsupported, InvalidConfig
from vzkit_runtime.syscalls import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWTIME,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    SyscallError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~2 ms to import: mypy only
    from typing import Any

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_ERRNO_BASE = 0x00050000
SCMP_ACT_TRACE_BASE = 0x7FF00000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000

#: OCI action name -> (libseccomp base action, takes an errno/trace value).
ACTIONS: dict[str, tuple[int, bool]] = {
    "SCMP_ACT_KILL": (SCMP_ACT_KILL_THREAD, False),
    "SCMP_ACT_KILL_THREAD": (SCMP_ACT_KILL_THREAD, False),
    "SCMP_ACT_KILL_PROCESS": (SCMP_ACT_KILL_PROCESS, False),
    "SCMP_ACT_TRAP": (SCMP_ACT_TRAP, False),
    "SCMP_ACT_ERRNO": (SCMP_ACT_ERRNO_BASE, True),
    "SCMP_ACT_TRACE": (SCMP_ACT_TRACE_BASE, True),
    "SCMP_ACT_ALLOW": (SCMP_ACT_ALLOW, False),
    "SCMP_ACT_LOG": (SCMP_ACT_LOG, False),
}

#: OCI comparison operator -> enum scmp_compare.
OPERATORS: dict[str, int] = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

#: OCI architecture -> libseccomp architecture name (resolved by the library).
ARCHITECTURES: dict[str, str] = {
    "SCMP_ARCH_X86": "x86",
    "SCMP_ARCH_X86_64": "x86_64",
    "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_ARM": "arm",
    "SCMP_ARCH_AARCH64": "aarch64",
}

# enum scmp_filter_attr
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_LOG = 6
_ATTR_CTL_SSB = 7

#: OCI filter flag -> libseccomp attribute set to 1.
FLAGS: dict[str, int] = {
    "SECCOMP_FILTER_FLAG_TSYNC": _ATTR_CTL_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": _ATTR_CTL_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": _ATTR_CTL_SSB,
}

_NR_SCMP_ERROR = -1


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_lib: ctypes.CDLL | None = None


def _libseccomp() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2")
        except OSError as exc:
            raise HostUnsupported(
                f"cannot load libseccomp: {exc}",
                "install libseccomp2 (apt-get install libseccomp2)",
            ) from None
        vp, u32 = ctypes.c_void_p, ctypes.c_uint32
        lib.seccomp_init.argtypes = [u32]
        lib.seccomp_init.restype = vp
        lib.seccomp_release.argtypes = [vp]
        lib.seccomp_release.restype = None
        lib.seccomp_load.argtypes = [vp]
        lib.seccomp_export_bpf.argtypes = [vp, ctypes.c_int]
        lib.seccomp_arch_add.argtypes = [vp, u32]
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_resolve_name.restype = u32
        lib.seccomp_attr_set.argtypes = [vp, ctypes.c_int, u32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [
            vp,
            u32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        _lib = lib
    return _lib


def _check(ret: int, call: str, what: str) -> None:
    # libseccomp returns -errno rather than setting errno.
    if ret < 0:
        raise SyscallError(call, -ret, what)


def resolve_action(name: str, errno_ret: int | None, where: str) -> int:
    """The libseccomp action for OCI action ``name``; ERRNO/TRACE default to EPERM."""
    try:
        base, takes_value = ACTIONS[name]
    except KeyError:
        raise InvalidConfig(
            f"unsupported seccomp action {name!r} in {where}",
            "use one of: " + ", ".join(ACTIONS),
        ) from None
    if not takes_value:
        return base
    value = errno.EPERM if errno_ret is None else int(errno_ret)
    return base | (value & 0xFFFF)


def _arg_groups(args: list[dict[str, Any]], where: str) -> list[list[_ArgCmp]]:
    """Comparisons for one rule, or one rule per comparison when an index repeats."""
    cmps = []
    for arg in args:
        op = arg.get("op")
        if op not in OPERATORS:
            raise InvalidConfig(
                f"unsupported seccomp operator {op!r} in {where}",
                "use one of: " + ", ".join(OPERATORS),
            )
        index = int(arg.get("index", 0))
        if not 0 <= index <= 5:
            raise InvalidConfig(
                f"seccomp argument index {index} out of range in {where}",
                "syscall arguments are numbered 0 to 5",
            )
        cmps.append(
            _ArgCmp(index, OPERATORS[op], int(arg.get("value", 0)), int(arg.get("valueTwo", 0)))
        )
    indexes = [c.arg for c in cmps]
    if len(set(indexes)) != len(indexes):
        return [[c] for c in cmps]
    return [cmps]


def _build(lib: ctypes.CDLL, config: dict[str, Any], skipped: list[str]) -> int:
    """A libseccomp context for ``config`` (the caller releases it)."""
    default = resolve_action(
        str(config.get("defaultAction", "")), config.get("defaultErrnoRet"), "defaultAction"
    )
    if config.get("listenerPath"):
        raise InvalidConfig(
            "seccomp notify (listenerPath) is not supported by vz-runtime",
            "remove listenerPath and SCMP_ACT_NOTIFY rules",
        )
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SyscallError("seccomp_init", errno.EINVAL, f"default action {default:#x}")
    try:
        _check(lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, 0), "seccomp_attr_set", "CTL_NNP")
        for arch in config.get("architectures") or []:
            token = lib.seccomp_arch_resolve_name(ARCHITECTURES.get(arch, "").encode())
            if arch not in ARCHITECTURES or token == 0:
                raise InvalidConfig(
                    f"unsupported seccomp architecture {arch!r}",
                    "use one of: " + ", ".join(ARCHITECTURES),
                )
            ret = lib.seccomp_arch_add(ctx, token)
            if ret != -errno.EEXIST:  # the native arch is already in the filter
                _check(ret, "seccomp_arch_add", arch)
        for flag in config.get("flags") or []:
            if flag not in FLAGS:
                raise InvalidConfig(
                    f"unsupported seccomp flag {flag!r}",
                    "use one of: " + ", ".join(FLAGS),
                )
            _check(lib.seccomp_attr_set(ctx, FLAGS[flag], 1), "seccomp_attr_set", flag)
        for i, rule in enumerate(config.get("syscalls") or []):
            where = f"linux.seccomp.syscalls[{i}]"
            action = resolve_action(str(rule.get("action", "")), rule.get("errnoRet"), where)
            if action == default:
                continue
            groups = _arg_groups(rule.get("args") or [], where)
            for name in rule.get("names") or []:
                nr = lib.seccomp_syscall_resolve_name(str(name).encode())
                if nr == _NR_SCMP_ERROR:
                    skipped.append(str(name))
                    continue
                for group in groups:
                    arr = (_ArgCmp * max(len(group), 1))(*group)
                    ret = lib.seccomp_rule_add_array(ctx, action, nr, len(group), arr)
                    _check(ret, "seccomp_rule_add", f"{name} in {where}")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    ctx_int: int = ctx
    return ctx_int


def load_seccomp(config: dict[str, Any]) -> list[str]:
    """Compile ``config`` (an OCI ``linux.seccomp`` object) and load it on this thread.

    Call it last before execve. It does not set no_new_privs (the caller does, from
    ``process.noNewPrivileges``); without it loading needs CAP_SYS_ADMIN.
    Returns the syscall names that were skipped because libseccomp does not know them.
    Raises InvalidConfig for an unknown action/operator/architecture/flag, SyscallError
    when libseccomp or the kernel refuses.
    """
    lib = _libseccomp()
    skipped: list[str] = []
    ctx = _build(lib, config, skipped)
    try:
        _check(lib.seccomp_load(ctx), "seccomp_load", "filter")
    finally:
        lib.seccomp_release(ctx)
    return skipped


def compile_bpf(config: dict[str, Any]) -> bytes:
    """The classic-BPF program libseccomp generates for ``config`` (struct sock_filter
    array), without loading it: the caller loads it with :func:`syscalls.seccomp_filter`
    (runtime.seccomp_program caches it on disk). Same checks and errors as
    :func:`load_seccomp`."""
    lib = _libseccomp()
    ctx = _build(lib, config, [])
    try:
        r, w = os.pipe()
        try:
            # The program is a few KB (8 bytes an instruction): it fits the pipe buffer.
            _check(lib.seccomp_export_bpf(ctx, w), "seccomp_export_bpf", "filter")
            os.close(w)
            w = -1
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        lib.seccomp_release(ctx)
    return b"".join(chunks)


# -- the default profile -------------------------------------------------------------------

_DENY_EPERM = (
    # keyrings are not namespaced
    "add_key",
    "keyctl",
    "request_key",
    # kernel code, modules, reboot
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    # mounts, old and new API
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # joining namespaces; unshare and clone are filtered by flag below
    "setns",
    # large kernel attack surface without capabilities
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "lookup_dcookie",
    "fanotify_init",
    # file handles bypass path permissions (the "shocker" escape)
    "open_by_handle_at",
    "name_to_handle_at",
    # reading or changing other processes' memory
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "process_madvise",
    "kcmp",
    # host-global state: time, swap, accounting, quotas, kernel log, terminals
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "vhangup",
    "_sysctl",
    "nfsservctl",
    "uselib",
    # raw I/O ports and vm86 mode
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    # NUMA policy across the host (Docker allows these only with CAP_SYS_NICE)
    "mbind",
    "migrate_pages",
    "move_pages",
    "set_mempolicy",
    "set_mempolicy_home_node",
)

_NS_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)
_PTRACE_ATTACH = 16
_PTRACE_SEIZE = 0x4206
# personality(2) flags that weaken the process (no ASLR, executable data, page zero...):
# ADDR_NO_RANDOMIZE through ADDR_LIMIT_3GB. The top nibble must be clear so the query
# value 0xffffffff (which has every bit set) still works.
_PERSONALITY_BAD = (0x0040000, 0x0080000, 0x0100000, 0x0200000, 0x0400000, 0x0800000)
_PERSONALITY_QUERY_BITS = 0xF0000000


def _masked(index: int, flag: int, mask: int | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "value": mask if mask is not None else flag,
        "valueTwo": flag,
        "op": "SCMP_CMP_MASKED_EQ",
    }


def _native_architectures() -> list[str]:
    machine = os.uname().machine
    if machine == "x86_64":
        return ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    if machine == "aarch64":
        return ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    return []


def default_profile() -> dict[str, Any]:
    """The default OCI seccomp object for containers (a fresh dict each call).

    A deny-list over defaultAction ALLOW; the module docstring explains the choice.
    """
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    rules: list[dict[str, Any]] = [{"names": list(_DENY_EPERM), **eperm}]
    # One rule per flag: libseccomp ORs rules, and MASKED_EQ tests one mask at a time.
    # (MASKED_EQ's "value" is the mask and "valueTwo" the expected result, as in libseccomp.)
    for flag in (*_NS_FLAGS, CLONE_NEWTIME):
        rules.append({"names": ["unshare"], "args": [_masked(0, flag)], **eperm})
    # In clone's flags the low byte is the exit signal, so CLONE_NEWTIME (0x80) is not
    # a namespace flag there.
    for flag in _NS_FLAGS:
        rules.append({"names": ["clone"], "args": [_masked(0, flag)], **eperm})
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    # Tracing other processes; PTRACE_TRACEME (a child asking its parent) stays allowed.
    for request in (_PTRACE_ATTACH, _PTRACE_SEIZE):
        arg = {"index": 0, "value": request, "op": "SCMP_CMP_EQ"}
        rules.append({"names": ["ptrace"], "args": [arg], **eperm})
    for bit in _PERSONALITY_BAD:
        arg = _masked(0, bit, mask=bit | _PERSONALITY_QUERY_BITS)
        rules.append({"names": ["personality"], "args": [arg], **eperm})
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": _native_architectures(),
        "syscalls": rules,
    }
