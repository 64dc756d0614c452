"""Container core on the real kernel: rootfs set-up and pivot, capabilities, seccomp.

Every test forks; the child unshares its namespaces, does the work, reports a JSON dict
through a pipe and always leaves with os._exit, so mounts and filters die with it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vzkit_runtime import caps, mounts, seccomp
from vzkit_runtime import syscalls as sc

pytestmark = pytest.mark.integration

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
Result = dict[str, Any]


def _run_forked(fn: Callable[[], Result], *, userns: bool = False, flags: int = 0) -> Result:
    """Run ``fn`` in a forked child after unshare(flags) and, with a pid namespace, as
    PID 1 of it. With ``userns`` the parent writes an identity map for 0-65535."""
    res_r, res_w = os.pipe()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    if userns:
        flags |= sc.CLONE_NEWUSER
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 70
        try:
            os.close(res_r)
            if flags:
                sc.unshare(flags)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
            if flags & sc.CLONE_NEWPID:
                inner = os.fork()
                if inner == 0:
                    _child_body(fn, res_w)
                _, status = os.waitpid(inner, 0)
                code = os.waitstatus_to_exitcode(status)
            else:
                _child_body(fn, res_w)
        except BaseException:
            os.write(res_w, json.dumps({"error": traceback.format_exc()}).encode())
        finally:
            os._exit(code)
    os.close(res_w)
    os.close(ready_w)
    os.close(go_r)
    try:
        os.read(ready_r, 1)
        if userns:
            for name in ("uid_map", "gid_map"):
                Path(f"/proc/{pid}/{name}").write_text("0 0 65536\n")
        os.write(go_w, b"1")
        chunks = []
        while chunk := os.read(res_r, 65536):
            chunks.append(chunk)
    finally:
        for fd in (res_r, ready_r, go_w):
            os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert chunks, f"child reported nothing (status {status:#x})"
    result: Result = json.loads(b"".join(chunks))
    assert "error" not in result, result["error"]
    return result


def _child_body(fn: Callable[[], Result], res_w: int) -> None:  # pragma: no cover - child
    code = 71
    try:
        out = json.dumps(fn()).encode()
        os.write(res_w, out)
        code = 0
    except BaseException:
        os.write(res_w, json.dumps({"error": traceback.format_exc()}).encode())
    finally:
        os._exit(code)


def _errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as exc:
        return exc.errno or -1
    except sc.SyscallError as exc:
        return exc.errno
    return 0


def _run_busybox(*args: str) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.execv("/bin/busybox", ["busybox", *args])
        finally:
            os._exit(127)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- rootfs --------------------------------------------------------------------------------


def _escape_name(tmp_path: Path) -> str:
    return f"vz-escape-{tmp_path.name}"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "etc/ro", "tmp", "secretdir"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "true", "cat", "ls"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "secret").write_text("top secret\n")
    (root / "etc" / "ro" / "file").write_text("x\n")
    (root / "secretdir" / "inside").write_text("hidden\n")
    # An image trying to make us mount over the host.
    (root / "evil").symlink_to("../../../../../../../../" + _escape_name(tmp_path))
    return root


def _spec(*, userns: bool, readonly: bool = False) -> Result:
    mnts: list[Result] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
            + ([] if userns else ["gid=5"]),
        },
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
        {"destination": "/evil", "type": "tmpfs", "source": "tmpfs"},
    ]  # fmt: skip
    if not userns:
        mnts.append(
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            }
        )
    return {
        "root": {"path": "rootfs", "readonly": readonly},
        "mounts": mnts,
        "linux": {
            "maskedPaths": [
                "/proc/kcore",
                "/proc/cpuinfo",
                "/etc/secret",
                "/secretdir",
                "/no/such/path",
            ],
            "readonlyPaths": ["/proc/sys", "/etc/ro", "/no/such/ro"],
        },
    }


def _inspect_container() -> Result:
    with open("/dev/null", "wb") as f:
        f.write(b"discarded")
    with open("/dev/null", "rb") as f:
        null_read = f.read()
    with open("/dev/zero", "rb") as f:
        zero = f.read(4)
    numeric = sorted(p for p in os.listdir("/proc") if p.isdigit())
    return {
        "pid": os.getpid(),
        "proc_self": os.readlink("/proc/self"),
        "proc_pids": numeric,
        "null_read": null_read.decode(),
        "zero": list(zero),
        "secret": Path("/etc/secret").read_text(),
        "secretdir": os.listdir("/secretdir"),
        "cpuinfo": Path("/proc/cpuinfo").read_text(),
        "ro_proc_sys": _errno_of(lambda: open("/proc/sys/kernel/hostname", "w")),
        "ro_etc": _errno_of(lambda: Path("/etc/ro/file").write_text("y")),
        "tmp_write": _errno_of(lambda: Path("/tmp/ok").write_text("y")),
        "root_write": _errno_of(lambda: Path("/newfile").write_text("y")),
        "host_visible": [p for p in ("/work", "/usr", "/home") if os.path.exists(p)],
        "dev": sorted(os.listdir("/dev")),
        "ptmx": os.readlink("/dev/ptmx"),
        "fd": os.readlink("/dev/fd"),
        "busybox_true": _run_busybox("true"),
        "busybox_sh": _run_busybox("sh", "-c", "ls / >/dev/null && cat /etc/ro/file >/dev/null"),
        "sys": os.path.isdir("/sys/kernel"),
        "cgroup": sorted(os.listdir("/sys/fs/cgroup")) if os.path.isdir("/sys/fs/cgroup") else [],
        "cgroup_write": _errno_of(lambda: os.mkdir("/sys/fs/cgroup/memory/x")),
        "cwd": os.getcwd(),
    }


def _check_common(r: Result, tmp_path: Path, rootfs: Path) -> None:
    assert r["pid"] == 1
    assert r["proc_self"] == "1", "/proc is the new pid namespace's"
    assert r["proc_pids"] == ["1"]
    assert r["null_read"] == ""
    assert r["zero"] == [0, 0, 0, 0]
    assert r["secret"] == ""
    assert r["secretdir"] == []
    assert r["cpuinfo"] == ""
    assert r["ro_proc_sys"] == errno.EROFS
    assert r["ro_etc"] == errno.EROFS
    assert r["tmp_write"] == 0
    assert r["host_visible"] == []
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx"} <= set(r["dev"])
    assert {"fd", "stdin", "stdout", "stderr"} <= set(r["dev"])
    assert r["ptmx"] == "pts/ptmx"
    assert r["fd"] == "/proc/self/fd"
    assert r["busybox_true"] == 0
    assert r["busybox_sh"] == 0
    assert r["sys"]
    assert r["cwd"] == "/"
    # The symlinked destination was created inside the rootfs, not on the host.
    assert not (Path("/") / _escape_name(tmp_path)).exists()
    assert (rootfs / _escape_name(tmp_path)).is_dir()


def test_prepare_rootfs_as_root(rootfs: Path, tmp_path: Path) -> None:
    spec = _spec(userns=False)

    def work() -> Result:
        mounts.prepare_rootfs(rootfs, spec, in_userns=False)
        return _inspect_container()

    r = _run_forked(work, flags=sc.CLONE_NEWNS | sc.CLONE_NEWPID)
    _check_common(r, tmp_path, rootfs)
    assert r["root_write"] == 0
    assert "memory" in r["cgroup"] and "pids" in r["cgroup"]
    assert r["cgroup_write"] == errno.EROFS
    assert (rootfs / "newfile").exists()


def test_prepare_rootfs_in_user_namespace_readonly_root(rootfs: Path, tmp_path: Path) -> None:
    spec = _spec(userns=True, readonly=True)

    def work() -> Result:
        mounts.prepare_rootfs(rootfs, spec, in_userns=True)
        return _inspect_container()

    r = _run_forked(work, userns=True, flags=sc.CLONE_NEWNS | sc.CLONE_NEWPID)
    _check_common(r, tmp_path, rootfs)
    assert r["root_write"] == errno.EROFS


def test_mount_errors_name_syscall_and_path(rootfs: Path) -> None:
    spec = {"mounts": [{"destination": "/x", "type": "nosuchfs", "source": "none"}]}

    def work() -> Result:
        try:
            mounts.prepare_rootfs(rootfs, spec, in_userns=False)
        except sc.SyscallError as exc:
            return {"message": exc.message, "hint": exc.hint}
        return {}

    r = _run_forked(work, flags=sc.CLONE_NEWNS)
    assert r["message"].startswith("mount(none on ")
    assert r["message"].endswith("/x): No such device")
    assert "filesystem type" in r["hint"]


# -- capabilities --------------------------------------------------------------------------


def _status_caps() -> Result:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Cap"):
            key, value = line.split(":")
            out[key] = int(value, 16)
    return out


def _mask(*names: str) -> int:
    return sum(1 << caps.CAPS[n] for n in names)


CAP_CONFIG = {
    "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID"],
    "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
    "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
    "inheritable": ["CAP_NET_BIND_SERVICE"],
    "ambient": ["CAP_NET_BIND_SERVICE"],
}


def test_apply_capabilities_as_root() -> None:
    def work() -> Result:
        warnings = caps.apply_capabilities(CAP_CONFIG)
        return {"warnings": warnings, **_status_caps()}

    r = _run_forked(work)
    assert r["warnings"] == []
    assert r["CapBnd"] == _mask("CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID")
    assert r["CapEff"] == r["CapPrm"] == _mask("CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE")
    assert r["CapInh"] == r["CapAmb"] == _mask("CAP_NET_BIND_SERVICE")


def test_apply_capabilities_after_setuid() -> None:
    def work() -> Result:
        caps.keep_caps_across_setuid()
        os.setgroups([])
        os.setgid(1000)
        os.setuid(1000)
        caps.apply_capabilities(CAP_CONFIG)
        return {"uid": os.getuid(), **_status_caps()}

    r = _run_forked(work)
    assert r["uid"] == 1000
    assert r["CapEff"] == _mask("CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE")
    assert r["CapBnd"] == _mask("CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID")
    assert r["CapAmb"] == _mask("CAP_NET_BIND_SERVICE")


# -- seccomp -------------------------------------------------------------------------------

_SYS_KEYCTL = 250
_SYS_PTRACE = 101
_SYS_PERSONALITY = 135


def _raw(nr: int, *args: int) -> int:
    libc = sc.libc()
    ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if ret == -1 else 0


def _run(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            devnull = os.open("/dev/null", os.O_WRONLY)
            os.dup2(devnull, 1)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_default_profile_denies_and_allows() -> None:
    def work() -> Result:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        skipped = seccomp.load_seccomp(seccomp.default_profile())
        sibling = os.getppid()
        py = (
            "import threading, subprocess, asyncio, json;"
            "t = threading.Thread(target=lambda: None); t.start(); t.join();"
            "assert subprocess.run(['/bin/busybox', 'true']).returncode == 0;"
            "asyncio.run(asyncio.sleep(0))"
        )
        return {
            "skipped": skipped,
            "keyctl": _raw(_SYS_KEYCTL, 0, 0, 0, 0),
            "mount": _errno_of(lambda: sc.mount("tmpfs", "/mnt", "tmpfs")),
            "unshare_ns": _errno_of(lambda: sc.unshare(sc.CLONE_NEWNS)),
            "unshare_user": _errno_of(lambda: sc.unshare(sc.CLONE_NEWUSER)),
            "unshare_files": _errno_of(lambda: sc.unshare(0x400)),  # CLONE_FILES
            "ptrace_attach": _raw(_SYS_PTRACE, 16, sibling, 0, 0),
            "no_aslr": _raw(_SYS_PERSONALITY, 0x0040000),
            "personality_query": _raw(_SYS_PERSONALITY, 0xFFFFFFFF),
            "getpid": os.getpid() > 0,
            "open": len(Path("/proc/self/status").read_text()) > 0,
            "busybox_true": _run([BUSYBOX, "true"]),
            "busybox_sh": _run([BUSYBOX, "sh", "-c", "echo hi | cat; ls /"]),
            "coreutils": _run(["/bin/sh", "-c", "ls / && cp /etc/hostname /tmp/. 2>&1; date"]),
            "python": _run([sys.executable, "-c", py]),
        }

    r = _run_forked(work)
    assert r["keyctl"] == errno.EPERM
    assert r["mount"] == errno.EPERM
    assert r["unshare_ns"] == errno.EPERM
    assert r["unshare_user"] == errno.EPERM
    assert r["unshare_files"] == 0
    assert r["ptrace_attach"] == errno.EPERM
    assert r["no_aslr"] == errno.EPERM
    assert r["personality_query"] == 0
    assert r["getpid"] and r["open"]
    assert r["busybox_true"] == 0
    assert r["busybox_sh"] == 0
    assert r["coreutils"] == 0
    assert r["python"] == 0


def test_custom_profile_errno_args_and_unknown_names() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [
            {"names": ["getppid", "no_such_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 99},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ERRNO",
                "args": [
                    {"index": 0, "value": 0x1234, "op": "SCMP_CMP_EQ"},
                    {"index": 0, "value": 0x4321, "op": "SCMP_CMP_EQ"},
                ],
            },
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},
        ],
    }

    def work() -> Result:
        skipped = seccomp.load_seccomp(profile)
        return {
            "skipped": skipped,
            "getppid": _raw(110),
            "p1": _raw(_SYS_PERSONALITY, 0x1234),
            "p2": _raw(_SYS_PERSONALITY, 0x4321),
            "query": _raw(_SYS_PERSONALITY, 0xFFFFFFFF),
        }

    r = _run_forked(work)
    assert r["skipped"] == ["no_such_syscall"]
    assert r["getppid"] == 99
    assert r["p1"] == r["p2"] == errno.EPERM
    assert r["query"] == 0
