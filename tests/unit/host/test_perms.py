"""Directory modes that keep local users out of vzd's state (without QEMU's group here:
its chown needs root, the modes are the same story)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vzkit.host import perms
from vzkit.settings import Settings


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def _settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(
        Settings(), state_dir=tmp_path / "state", runtime_dir=tmp_path / "run", qemu_user=""
    )


def test_tighten_closes_an_old_state_dir(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    vm, ct = s.instances_dir / "vm-uuid", s.instances_dir / "ct-uuid"
    for d in (vm / "snapshots" / "s1", ct / "upper" / "etc", s.images_dir / "blobs",
              s.images_dir / "rootfs" / "tree", s.state_dir / "pki", tmp_path / "pool" / "volumes",
              s.instance_runtime_dir):  # fmt: skip
        d.mkdir(parents=True, mode=0o755)
    files = {
        s.db_path: 0o644,
        s.state_dir / "audit.log": 0o644,
        vm / "root.qcow2": 0o644,
        vm / "snapshots" / "s1" / "memory.state": 0o644,
        ct / "console.log": 0o644,
        ct / "upper" / "etc" / "passwd": 0o644,
        s.images_dir / "blobs" / "sha256-1": 0o444,
        s.state_dir / "pki" / "ca.key": 0o644,
        tmp_path / "pool" / "volumes" / "v.qcow2": 0o644,
    }
    for path, mode in files.items():
        path.write_bytes(b"x")
        path.chmod(mode)
    for d in (s.state_dir, s.instances_dir, vm, ct):
        d.chmod(0o755)
    perms.tighten(s, ["vm-uuid", "missing"], ["ct-uuid"], [tmp_path / "pool"])
    assert _mode(s.state_dir) == _mode(s.runtime_dir) == 0o711
    assert _mode(s.instances_dir) == _mode(s.instance_runtime_dir) == 0o711
    assert _mode(vm) == _mode(ct) == 0o700
    assert _mode(s.images_dir / "rootfs") == 0o700 and _mode(s.images_dir) == 0o700
    assert _mode(tmp_path / "pool") == _mode(tmp_path / "pool" / "volumes") == 0o700
    for path, mode in files.items():
        if path == ct / "upper" / "etc" / "passwd":
            assert _mode(path) == 0o644  # the container's own file
        elif path.parent.name == "blobs":
            assert _mode(path) == 0o400
        elif path.parent.name == "volumes":
            assert _mode(path) == 0o600  # root's alone: QEMU gets a descriptor
        else:
            assert _mode(path) == mode & ~0o007, path
    perms.tighten(s, ["vm-uuid"], ["ct-uuid"], [tmp_path / "pool"])  # idempotent
    assert _mode(vm) == 0o700


def test_make_dir_sets_the_mode_of_an_existing_dir(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    assert _mode(perms.make_dir(d, perms.PASS_THROUGH)) == 0o711
    d.chmod(0o777)
    assert _mode(perms.make_dir(d, perms.PRIVATE)) == 0o700
    assert _mode(perms.vm_dir(tmp_path / "vm", None)) == 0o700
