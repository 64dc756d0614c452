"""vz-runtime file-read / file-write: a running container's files, read and written from
inside its mount namespace by the runtime's own helper, in an image without a shell."""

# ruff: noqa: F811  (rt, shared_dir: fixtures imported from other test modules, used by name)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import wait_for
from tests.integration.test_runtime_resources import (  # noqa: F401 - a fixture used by name
    BUSYBOX,
    Runtime,
    rt,
)
from tests.integration.test_runtime_userns_hooks import (  # noqa: F401 - a fixture used by name
    HOST_ID,
    _chown_tree,
    _userns,
    shared_dir,
)

pytestmark = pytest.mark.integration


def _no_shell(config: dict[str, Any]) -> None:
    """Only /bin/sleep (busybox under another name) is left: no sh, no cat, no mv."""
    rootfs = Path(config["root"]["path"])
    shutil.rmtree(rootfs / "bin")
    (rootfs / "bin").mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "sleep")
    (rootfs / "root").mkdir()
    # Links a hostile image could ship: to a host path, absolute and by enough "..".
    (rootfs / "root" / "abs").symlink_to("/etc")
    (rootfs / "root" / "up").symlink_to("../" * 12 + "etc")
    (rootfs / "etc" / "motd").write_text("the container's motd\n")


def _start(rt: Runtime, edit: Any = _no_shell) -> tuple[str, Path]:
    cid = rt.start(["sleep", "1000"], edit=edit)
    return cid, rt.tmp / f"bundle{rt.bundles}" / "rootfs"


def _write(
    rt: Runtime, cid: str, path: str, data: bytes, *args: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*rt.command, "--root", str(rt.root), "file-write", *args, cid, path],
        input=data,
        capture_output=True,
        timeout=30,
    )


def _read(rt: Runtime, cid: str, path: str) -> tuple[dict[str, Any], bytes]:
    proc = subprocess.run(
        [*rt.command, "--root", str(rt.root), "file-read", "--header", cid, path],
        capture_output=True,
        timeout=30,
        check=True,
    )
    head, _, data = proc.stdout.partition(b"\n")
    header: dict[str, Any] = json.loads(head)
    return header, data


def test_write_and_read_without_a_shell(rt: Runtime) -> None:
    cid, rootfs = _start(rt)
    data = os.urandom(200_000).hex().encode()
    assert _write(rt, cid, "/srv/new/data", data, "--mode", "640", "--parents").returncode == 0
    assert (rootfs / "srv" / "new" / "data").read_bytes() == data
    header, got = _read(rt, cid, "/srv/new/data")
    assert got == data and header == {"mode": 0o100640, "size": len(data)}
    # Replaced whole: the old file, or the new one.
    assert _write(rt, cid, "/srv/new/data", b"short").returncode == 0
    assert _read(rt, cid, "/srv/new/data")[1] == b"short"
    assert sorted(os.listdir(rootfs / "srv" / "new")) == ["data"], "no temporary file left"
    # Without a header: the bytes alone, as with cat.
    plain = rt("file-read", cid, "/srv/new/data")
    assert plain.stdout == "short"


def test_symlinks_resolve_inside_the_container(rt: Runtime) -> None:
    cid, rootfs = _start(rt)
    host_motd = Path("/etc/motd").read_bytes() if Path("/etc/motd").exists() else None
    for link in ("/root/abs", "/root/up"):
        assert _read(rt, cid, f"{link}/motd")[1] == b"the container's motd\n"
    for link in ("/root/abs", "/root/up"):
        assert _write(rt, cid, f"{link}/motd", link.encode()).returncode == 0
        assert (rootfs / "etc" / "motd").read_bytes() == link.encode()
    assert (Path("/etc/motd").read_bytes() if Path("/etc/motd").exists() else None) == host_motd
    # PATH itself a link: replaced by the file, not written through.
    assert _write(rt, cid, "/root/abs", b"file").returncode == 0
    assert not (rootfs / "root" / "abs").is_symlink()
    assert (rootfs / "etc" / "motd").read_bytes() == b"/root/up"


def test_bad_requests_fail_clearly(rt: Runtime) -> None:
    cid, rootfs = _start(rt)
    cases = [
        (["--mode", "4755"], "/x", "mode 4755 sets setuid or setgid"),
        (["--mode", "9z"], "/x", "invalid mode '9z'"),
        ([], "relative", "invalid path 'relative'"),
        ([], "/no/such/dir/x", "directory /no/such/dir does not exist in the container"),
        ([], "/etc", "/etc is a directory"),
    ]
    for args, path, message in cases:
        proc = _write(rt, cid, path, b"x", *args)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and f"error: {message}" in err, (path, err)
        assert "hint:" in err
    assert not (rootfs / "x").exists()
    assert _write(rt, cid, "/suid", b"x", "--mode", "4755", "--allow-setid").returncode == 0
    assert (rootfs / "suid").stat().st_mode & 0o7777 == 0o4755
    for path, message in (("/dev/null", "is not a regular file"), ("/nope", "does not exist")):
        read = rt("file-read", cid, path, check=False)
        assert read.returncode == 1 and message in read.stderr, read.stderr
    rt("delete", "--force", cid)
    proc = _write(rt, cid, "/x", b"x")
    assert proc.returncode == 1 and b"does not exist" in proc.stderr


def test_an_interrupted_write_commits_nothing(rt: Runtime) -> None:
    """The caller gives up mid-stream (kills the runtime): no file, no temporary file."""
    cid, rootfs = _start(rt)
    writer = subprocess.Popen(
        [*rt.command, "--root", str(rt.root), "file-write", cid, "/srv-partial"],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert writer.stdin is not None
    writer.stdin.write(b"x" * 100_000)
    writer.stdin.flush()
    assert wait_for(lambda: any(n.startswith(".srv-partial") for n in os.listdir(rootfs)), 10)
    writer.terminate()
    writer.wait(10)
    writer.stdin.close()
    # The helper in the container follows its runtime (PDEATHSIG) and cleans up.
    assert wait_for(lambda: not any("srv-partial" in n for n in os.listdir(rootfs)), 10)
    time.sleep(0.2)
    assert not any("srv-partial" in n for n in os.listdir(rootfs))


def test_files_belong_to_the_user_namespaces_root(rt: Runtime, shared_dir: Path) -> None:
    rt.tmp = shared_dir  # the mapped root must be able to reach the bundle

    def edit(config: dict[str, Any]) -> None:
        _no_shell(config)
        _userns(config)
        _chown_tree(Path(config["root"]["path"]), HOST_ID, HOST_ID)

    cid, rootfs = _start(rt, edit)
    assert _write(rt, cid, "/root/owned", b"x", "--mode", "600").returncode == 0
    st = (rootfs / "root" / "owned").stat()
    assert (st.st_uid, st.st_gid) == (HOST_ID, HOST_ID)
    assert _read(rt, cid, "/root/owned")[1] == b"x"
