"""Mount option parsing and in-rootfs path resolution (pure parts of mounts.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzkit_runtime import mounts
from vzkit_runtime import syscalls as sc
from vzkit_runtime.errors import InvalidConfig
from vzkit_runtime.syscalls import SyscallError


def test_flags_data_and_propagation_are_split() -> None:
    opts = mounts.parse_mount_options(
        ["nosuid", "noexec", "nodev", "mode=755", "size=65536k", "rprivate", "strictatime"]
    )
    assert opts.flags == sc.MS_NOSUID | sc.MS_NOEXEC | sc.MS_NODEV | sc.MS_STRICTATIME
    assert opts.data_str == "mode=755,size=65536k"
    assert opts.propagation == [sc.MS_PRIVATE | sc.MS_REC]


def test_devpts_options_go_to_data() -> None:
    opts = mounts.parse_mount_options(
        ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
    )
    assert opts.flags == sc.MS_NOSUID | sc.MS_NOEXEC
    assert opts.data == ["newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]


def test_rbind_ro_and_later_rw_wins() -> None:
    opts = mounts.parse_mount_options(["rbind", "ro"])
    assert opts.bind and opts.flags & sc.MS_REC and opts.flags & sc.MS_RDONLY
    opts = mounts.parse_mount_options(["bind", "ro", "rw"])
    assert opts.flags == sc.MS_BIND
    assert opts.clear & sc.MS_RDONLY


def test_empty_and_none() -> None:
    opts = mounts.parse_mount_options(None)
    assert (opts.flags, opts.data_str, opts.propagation) == (0, None, [])
    assert mounts.parse_mount_options(["defaults", ""]).flags == 0


@pytest.mark.parametrize("opt", ["idmap", "tmpcopyup", "rro"])
def test_unsupported_options_are_refused(opt: str) -> None:
    with pytest.raises(InvalidConfig, match=opt):
        mounts.parse_mount_options([opt])


def test_all_propagation_names() -> None:
    for name, flag in mounts.PROPAGATION.items():
        assert mounts.parse_mount_options([name]).propagation == [flag]


def _rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    return root


def test_absolute_symlink_stays_in_rootfs(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    (root / "hostetc").symlink_to("/etc")
    assert mounts.resolve_in_root(root, "/hostetc/passwd") == str(root / "etc" / "passwd")


def test_dotdot_symlink_is_clamped_to_rootfs(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    (root / "usr" / "escape").symlink_to("../../../../../../tmp")
    resolved = mounts.resolve_in_root(root, "/usr/escape/x")
    assert resolved == str(root / "tmp" / "x")
    assert not resolved.startswith(str(tmp_path / "tmp"))


def test_relative_symlink_and_dotdot_in_path(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    (root / "lib").symlink_to("usr/lib")
    assert mounts.resolve_in_root(root, "lib/x") == str(root / "usr" / "lib" / "x")
    assert mounts.resolve_in_root(root, "/../../etc/../lib") == str(root / "usr" / "lib")
    assert mounts.resolve_in_root(root, "/") == str(root)


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(SyscallError) as info:
        mounts.resolve_in_root(root, "/a/x")
    assert "Too many levels" in info.value.message


def test_mount_target_outside_rootfs_is_refused(tmp_path: Path) -> None:
    # A path that was swapped for a symlink after resolution must not be mounted on.
    root = _rootfs(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    fd = os.open(outside, os.O_PATH)
    try:
        with pytest.raises(InvalidConfig, match="outside the rootfs"):
            mounts._check_inside(str(root), fd, "/proc")
    finally:
        os.close(fd)


def test_create_mount_point_file_and_dir(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    f = mounts.resolve_in_root(root, "/etc/resolv.conf")
    mounts.create_mount_point(str(root), f, is_file=True)
    assert os.path.isfile(f)
    d = mounts.resolve_in_root(root, "/a/b/c")
    mounts.create_mount_point(str(root), d, is_file=False)
    assert os.path.isdir(d)


def test_create_mount_point_refuses_symlink_component(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(SyscallError):
        mounts.create_mount_point(str(root), str(root / "link" / "x"), is_file=False)
    assert not (tmp_path / "x").exists()


def test_mountinfo_parsing() -> None:
    text = (
        "22 27 0:21 / /proc rw,relatime shared:5 - proc proc rw\n"
        "32 31 0:29 /docker /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        "40 27 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
    )
    infos = mounts.read_mountinfo(text)
    assert infos[0]["optional"] == "shared:5"
    assert infos[1]["root"] == "/docker" and infos[1]["super"] == "rw,cpu"
    assert infos[2]["mountpoint"] == "/mnt/with space"


def test_device_list_merges_defaults() -> None:
    devs = mounts._device_list([{"path": "/dev/null", "type": "c", "major": 1, "minor": 3}])
    paths = [d["path"] for d in devs]
    assert paths.count("/dev/null") == 1
    assert {"/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"} <= set(paths)
