"""SyscallError messages, errno hints and constant tables."""

from __future__ import annotations

import errno

import pytest

from vzkit_runtime import syscalls as sc
from vzkit_runtime.errors import EngineError


def test_error_names_syscall_path_and_errno() -> None:
    err = sc.SyscallError("mount", errno.EPERM, "proc on /proc")
    assert err.message == "mount(proc on /proc): Operation not permitted"
    assert isinstance(err, EngineError)
    assert (err.syscall, err.errno, err.path) == ("mount", errno.EPERM, "proc on /proc")
    assert err.code == "syscall_error"
    assert err.to_dict()["details"]["errno"] == errno.EPERM


@pytest.mark.parametrize(
    ("err", "words"),
    [
        (errno.EPERM, "CAP_SYS_ADMIN"),
        (errno.ENOENT, "does not exist in the rootfs"),
        (errno.EINVAL, "invalid argument"),
        (errno.ENODEV, "filesystem type"),
        (errno.EBUSY, "busy"),
    ],
)
def test_hints_per_errno(err: int, words: str) -> None:
    assert words in sc.SyscallError("mount", err, "/x").hint  # type: ignore[operator]


def test_hint_specialised_by_syscall() -> None:
    assert "namespace" in sc.hint_for_errno(errno.EINVAL, "setns")
    assert "CAP_SETPCAP" in sc.hint_for_errno(errno.EPERM, "capset")
    assert sc.hint_for_errno(12345)  # unknown errno still gets a hint


def test_namespace_tables() -> None:
    assert set(sc.NAMESPACES) == {"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"}
    assert sc.NAMESPACES["mount"] == 0x00020000
    assert sc.NAMESPACES["user"] == 0x10000000
    assert sc.NAMESPACE_FILES["network"] == "net"
    assert sc.NAMESPACE_FILES["mount"] == "mnt"
    assert set(sc.NAMESPACE_FILES) == set(sc.NAMESPACES)


def test_failing_call_raises_named_error(tmp_path: object) -> None:
    with pytest.raises(sc.SyscallError) as info:
        sc.umount2("/definitely/not/here")
    assert info.value.syscall == "umount2"
    assert info.value.path == "/definitely/not/here"
    assert info.value.errno in (errno.ENOENT, errno.EPERM)


def test_capget_reports_masks() -> None:
    eff, prm, _inh = sc.capget()
    assert eff & ~prm == 0


def test_seccomp_load_hint_mentions_no_new_privs() -> None:
    assert "noNewPrivileges" in sc.hint_for_errno(errno.EACCES, "seccomp_load")
