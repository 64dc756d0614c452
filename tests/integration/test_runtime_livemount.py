"""vz-runtime mount / umount: bind mounts into and out of a running container."""

# ruff: noqa: F811  (rt, bundle: fixtures imported from test_runtime_cli, used by name)

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import wait_for
from tests.integration.test_runtime_cli import (  # noqa: F401 - fixtures used by name
    BundleFactory,
    Runtime,
    _assert_nothing_left,
    _leave_nothing_behind,
    bundle,
    rt,
)
from tests.integration.test_runtime_userns_hooks import HOST_ID, _chown_tree, _userns

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def host_dir(rt: Runtime) -> Iterator[Path]:
    """A host directory to mount, outside pytest's 0700 tmp tree (a mapped uid can
    traverse it), holding ``file``. Removed once the containers are deleted."""
    d = Path(tempfile.mkdtemp(prefix="vz-livemount-", dir="/tmp"))
    d.chmod(0o755)
    (d / "file").write_text("hello\n")
    (d / "file").chmod(0o644)
    try:
        yield d
    finally:
        rt.cleanup()  # before rt's own teardown (which runs after this one): idempotent
        shutil.rmtree(d, ignore_errors=True)


def _writable_root(c: dict[str, Any]) -> None:
    c["root"]["readonly"] = False


Start = Callable[..., str]


@pytest.fixture
def start(rt: Runtime, bundle: BundleFactory) -> Start:
    """Run a detached `sleep 1000` container (rt deletes it at the end); its id."""

    def make(edit: Callable[[dict[str, Any]], None] = _writable_root) -> str:
        cid = rt.new_id()
        rt("run", "--detach", "--bundle", str(bundle(["sleep", "1000"], edit)), cid)
        assert rt.state(cid)["status"] == "running"
        return cid

    return make


def _mount_points(rt: Runtime, cid: str) -> list[str]:
    """The mount points the container's processes see."""
    text = rt("exec", cid, "cat", "/proc/self/mountinfo").stdout
    return [line.split()[4] for line in text.splitlines()]


def _exists(rt: Runtime, cid: str, path: str) -> bool:
    return rt("exec", cid, "test", "-e", path, check=False).returncode == 0


def _fails(rt: Runtime, *args: str) -> str:
    proc = rt(*args, check=False)
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "\nhint: " in proc.stderr, proc.stderr
    return proc.stderr


# ---------------------------------------------------------------------------- mount / umount


def test_mount_directory_read_write_then_umount(rt: Runtime, start: Start, host_dir: Path) -> None:
    cid = start()
    assert rt("mount", cid, str(host_dir), "/mnt/data").stdout == ""
    assert "/mnt/data" in _mount_points(rt, cid)
    assert rt("exec", cid, "cat", "/mnt/data/file").stdout == "hello\n"
    rt("exec", cid, "sh", "-c", "echo from-inside > /mnt/data/new")
    assert (host_dir / "new").read_text() == "from-inside\n"

    assert rt("umount", cid, "/mnt/data").stdout == ""
    assert "/mnt/data" not in _mount_points(rt, cid)
    assert not _exists(rt, cid, "/mnt/data/file")
    assert _exists(rt, cid, "/mnt/data")  # the mount point stays, as with umount(8)
    # The host's copy is untouched, and the mount can be made again.
    assert (host_dir / "file").read_text() == "hello\n"
    rt("mount", cid, str(host_dir), "/mnt/data")
    assert rt("exec", cid, "cat", "/mnt/data/new").stdout == "from-inside\n"


def test_mount_readonly(rt: Runtime, start: Start, host_dir: Path) -> None:
    cid = start()
    rt("mount", "--readonly", cid, str(host_dir), "/data")
    assert rt("exec", cid, "cat", "/data/file").stdout == "hello\n"
    proc = rt("exec", cid, "sh", "-c", "echo x > /data/file", check=False)
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    proc = rt("exec", cid, "touch", "/data/other", check=False)
    assert proc.returncode != 0
    assert (host_dir / "file").read_text() == "hello\n"
    assert not (host_dir / "other").exists()
    # A read-write mount of the same directory elsewhere is independent of it.
    rt("mount", cid, str(host_dir), "/data-rw")
    rt("exec", cid, "touch", "/data-rw/other")
    assert (host_dir / "other").exists()


def test_mount_single_file(rt: Runtime, start: Start, host_dir: Path) -> None:
    cid = start()
    rt("mount", cid, str(host_dir / "file"), "/etc/app/app.conf")
    assert rt("exec", cid, "cat", "/etc/app/app.conf").stdout == "hello\n"
    assert "/etc/app/app.conf" in _mount_points(rt, cid)
    rt("umount", cid, "/etc/app/app.conf")
    assert "/etc/app/app.conf" not in _mount_points(rt, cid)
    assert rt("exec", cid, "cat", "/etc/app/app.conf").stdout == ""  # the empty mount point


def test_mount_onto_existing_directory_of_a_readonly_root(
    rt: Runtime, start: Start, host_dir: Path
) -> None:
    cid = start(lambda c: None)  # `vz-runtime spec`'s default: root.readonly
    rt("mount", cid, str(host_dir), "/tmp")
    assert rt("exec", cid, "cat", "/tmp/file").stdout == "hello\n"
    err = _fails(rt, "mount", cid, str(host_dir), "/new/dir")
    assert "Read-only file system" in err and "read-only mount" in err


def test_mount_into_a_user_namespace_container(
    rt: Runtime, bundle: BundleFactory, host_dir: Path
) -> None:
    def edit(c: dict[str, Any]) -> None:
        _userns(c)
        _writable_root(c)

    b = bundle(["sleep", "1000"], edit)
    moved = Path(shutil.move(str(b), str(host_dir / "bundle")))
    _chown_tree(moved / "rootfs", HOST_ID, HOST_ID)
    os.chown(host_dir / "file", HOST_ID, HOST_ID)
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", str(moved), cid)
    assert rt("exec", cid, "cat", "/proc/self/uid_map").stdout.split()[1] == str(HOST_ID)

    rt("mount", cid, str(host_dir), "/mnt/data")
    assert rt("exec", cid, "cat", "/mnt/data/file").stdout == "hello\n"
    rt("exec", cid, "sh", "-c", "echo from-inside >> /mnt/data/file")
    assert (host_dir / "file").read_text() == "hello\nfrom-inside\n"
    rt("mount", "--readonly", cid, str(host_dir / "file"), "/ro.conf")
    proc = rt("exec", cid, "sh", "-c", "echo x > /ro.conf", check=False)
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    rt("umount", cid, "/mnt/data")
    rt("umount", cid, "/ro.conf")
    points = _mount_points(rt, cid)
    assert "/mnt/data" not in points and "/ro.conf" not in points
    rt("delete", "--force", cid)
    _assert_nothing_left(rt, cid)


# ---------------------------------------------------------------------------- errors


def test_errors_leave_nothing_behind(rt: Runtime, start: Start, host_dir: Path) -> None:
    cid = start()
    missing = host_dir / "missing"
    err = _fails(rt, "mount", cid, str(missing), "/mnt/missing")
    assert f"mount source {missing} does not exist" in err
    assert not _exists(rt, cid, "/mnt")

    err = _fails(rt, "mount", cid, str(host_dir), "mnt/data")
    assert "not an absolute path" in err
    err = _fails(rt, "mount", cid, str(host_dir), "/mnt/../etc")
    assert "contains '..'" in err
    err = _fails(rt, "mount", cid, str(host_dir), "/")
    assert "root" in err
    err = _fails(rt, "mount", "no-such-id", str(host_dir), "/mnt/data")
    assert "container 'no-such-id' does not exist" in err
    err = _fails(rt, "umount", "no-such-id", "/mnt/data")
    assert "container 'no-such-id' does not exist" in err

    err = _fails(rt, "umount", cid, "/etc")
    assert "/etc is not a mount point" in err
    err = _fails(rt, "umount", cid, "/mnt/never")
    assert "/mnt/never is not a mount point" in err
    err = _fails(rt, "umount", cid, "relative")
    assert "not an absolute path" in err

    # Already a mount point: the container's own, or one made here.
    err = _fails(rt, "mount", cid, str(host_dir), "/proc")
    assert "/proc is already a mount point" in err
    rt("mount", cid, str(host_dir), "/mnt/data")
    err = _fails(rt, "mount", cid, str(host_dir), "/mnt/data")
    assert "/mnt/data is already a mount point" in err
    assert _mount_points(rt, cid).count("/mnt/data") == 1

    # A directory over a file and a file over a directory are refused.
    err = _fails(rt, "mount", cid, str(host_dir), "/bin/busybox")
    assert "not a directory" in err
    err = _fails(rt, "mount", cid, str(host_dir / "file"), "/etc")
    assert "not a file" in err
    # Nothing was created for the failed attempts.
    assert rt("exec", cid, "ls", "/mnt").stdout.split() == ["data"]
    assert not _exists(rt, cid, "/mnt/missing")


def test_not_running(rt: Runtime, start: Start, host_dir: Path) -> None:
    cid = start()
    rt("kill", cid, "KILL")
    assert wait_for(lambda: rt.state(cid)["status"] == "stopped", 5)
    err = _fails(rt, "mount", cid, str(host_dir), "/mnt/data")
    assert f"cannot mount into container '{cid}': it is stopped" in err
    err = _fails(rt, "umount", cid, "/mnt/data")
    assert "it is stopped" in err
    rt("delete", cid)
    _assert_nothing_left(rt, cid)


def test_mount_survives_in_paused_and_dies_with_the_container(
    rt: Runtime, start: Start, host_dir: Path
) -> None:
    cid = start()
    rt("mount", cid, str(host_dir), "/mnt/data")
    rt("pause", cid)
    rt("umount", cid, "/mnt/data")
    rt("mount", cid, str(host_dir), "/mnt/data")
    rt("resume", cid)
    assert rt("exec", cid, "cat", "/mnt/data/file").stdout == "hello\n"
    rt("delete", "--force", cid)
    _assert_nothing_left(rt, cid)
    assert (host_dir / "file").read_text() == "hello\n"  # the source outlives the mount


def test_failed_move_mount_removes_what_it_created(
    rt: Runtime, start: Start, host_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """move_mount failing after the mount point was made: it is removed again. Run in
    this process, with the container's namespaces left out (TARGET is then a host path)."""
    from vzkit_runtime import livemount
    from vzkit_runtime import syscalls as sc
    from vzkit_runtime.errors import EngineError

    def fail(*_args: object) -> None:
        raise sc.SyscallError("move_mount", errno.EINVAL, "x")

    def here(_st: object, work: Callable[[], None]) -> None:
        work()

    monkeypatch.setattr(livemount, "in_container", here)
    monkeypatch.setattr(sc, "move_mount", fail)
    cid = start()
    keep = tmp_path / "keep"
    keep.mkdir()
    for source, target in (
        (host_dir, keep / "a" / "b" / "c"),
        (host_dir / "file", keep / "d" / "e.conf"),
    ):
        with pytest.raises(EngineError, match="move_mount"):
            livemount.mount(str(rt.root), cid, str(source), str(target))
        assert os.listdir(keep) == []
    (keep / "full").mkdir()
    with pytest.raises(EngineError, match="move_mount"):
        livemount.mount(str(rt.root), cid, str(host_dir), str(keep / "full"))
    assert os.listdir(keep) == ["full"]  # what was there before stays


def test_help_lists_the_commands(rt: Runtime) -> None:
    out = rt("--help").stdout
    assert "mount" in out and "umount" in out
    usage = rt("mount", "--help").stdout
    assert "--readonly" in usage and "source" in usage and "target" in usage
    proc = rt("mount", "only-an-id", check=False)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    assert json.loads(rt("list", "--format", "json").stdout) == []
