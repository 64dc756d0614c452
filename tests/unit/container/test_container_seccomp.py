"""Seccomp profile structure and config validation (no filter is loaded here)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from vzkit_runtime import seccomp
from vzkit_runtime.errors import InvalidConfig


def _names(profile: dict[str, Any]) -> set[str]:
    return {n for rule in profile["syscalls"] for n in rule["names"]}


def test_default_profile_shape() -> None:
    profile = seccomp.default_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "SCMP_ARCH_X86_64" in profile["architectures"]
    for rule in profile["syscalls"]:
        assert rule["action"] in seccomp.ACTIONS
        for arg in rule.get("args", []):
            assert arg["op"] in seccomp.OPERATORS
            assert 0 <= arg["index"] <= 5
    assert seccomp.default_profile() is not profile  # fresh each call


def test_default_profile_covers_the_required_deny_list() -> None:
    required = {
        "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "mount",
        "umount2", "pivot_root", "bpf", "ptrace", "perf_event_open", "userfaultfd",
        "open_by_handle_at", "init_module", "finit_module", "delete_module", "swapon",
        "swapoff", "reboot", "settimeofday", "clock_settime", "adjtimex", "acct", "unshare",
        "setns", "clone", "lookup_dcookie", "name_to_handle_at", "quotactl", "syslog",
        "vhangup", "iopl", "ioperm", "personality", "uselib", "nfsservctl", "kcmp",
        "process_vm_readv", "process_vm_writev", "mbind", "migrate_pages", "move_pages",
        "set_mempolicy",
    }  # fmt: skip
    assert required <= _names(seccomp.default_profile())


def test_default_profile_never_denies_basics() -> None:
    basics = {"read", "write", "openat", "execve", "getpid", "mmap", "futex", "wait4", "fork"}
    assert not basics & _names(seccomp.default_profile())


def test_unshare_and_clone_rules_check_namespace_flags() -> None:
    profile = seccomp.default_profile()
    masks: dict[str, set[int]] = {
        rule["names"][0]: set()
        for rule in profile["syscalls"]
        if rule["names"][0] in ("unshare", "clone")
    }
    for rule in profile["syscalls"]:
        if rule["names"][0] in masks:
            (arg,) = rule["args"]
            assert arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["value"] == arg["valueTwo"]
            masks[rule["names"][0]].add(arg["value"])
    assert 0x00020000 in masks["unshare"] and 0x10000000 in masks["unshare"]
    assert 0x80 in masks["unshare"] and 0x80 not in masks["clone"]  # exit signal byte


def test_clone3_answers_enosys() -> None:
    (rule,) = [r for r in seccomp.default_profile()["syscalls"] if r["names"] == ["clone3"]]
    assert rule["errnoRet"] == errno.ENOSYS


def test_actions() -> None:
    assert seccomp.resolve_action("SCMP_ACT_ALLOW", None, "x") == seccomp.SCMP_ACT_ALLOW
    assert seccomp.resolve_action("SCMP_ACT_ERRNO", None, "x") == 0x00050000 | errno.EPERM
    assert seccomp.resolve_action("SCMP_ACT_ERRNO", 38, "x") == 0x00050000 | 38
    assert seccomp.resolve_action("SCMP_ACT_KILL", None, "x") == 0
    with pytest.raises(InvalidConfig, match="SCMP_ACT_DANCE"):
        seccomp.resolve_action("SCMP_ACT_DANCE", None, "x")


def test_invalid_operator_is_named() -> None:
    with pytest.raises(InvalidConfig, match="SCMP_CMP_SOMETIMES"):
        seccomp._arg_groups([{"index": 0, "value": 1, "op": "SCMP_CMP_SOMETIMES"}], "x")


def test_repeated_index_becomes_separate_rules() -> None:
    args = [
        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"},
        {"index": 1, "value": 3, "op": "SCMP_CMP_EQ"},
    ]
    assert [len(g) for g in seccomp._arg_groups(args, "x")] == [1, 1, 1]
    assert [len(g) for g in seccomp._arg_groups(args[1:], "x")] == [2]


def test_invalid_config_is_refused_before_loading() -> None:
    with pytest.raises(InvalidConfig, match="defaultAction"):
        seccomp.load_seccomp({"defaultAction": "SCMP_ACT_NOPE"})
    with pytest.raises(InvalidConfig, match="SCMP_ARCH_VAX"):
        seccomp.load_seccomp(
            {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}
        )
    with pytest.raises(InvalidConfig, match="SCMP_CMP_X"):
        seccomp.load_seccomp(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"op": "SCMP_CMP_X"}]}
                ],
            }
        )
