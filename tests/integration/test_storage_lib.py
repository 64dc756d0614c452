"""The storage library against real qemu-img: qcow2 files, snapshots, overlays, full disks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.errors import (
    Conflict,
    EngineError,
    HostUnsupported,
    InvalidConfig,
    NotFound,
    ResourceExhausted,
)
from vzkit.storage import DirPool, qcow2

pytestmark = pytest.mark.integration

MiB = 1024**2


def qemu_io(path: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def write(path: Path, pattern: int, offset: int = 0, length: str = "64k") -> None:
    done = qemu_io(path, f"write -P {pattern:#x} {offset} {length}")
    assert done.returncode == 0 and "wrote" in done.stdout, done.stdout + done.stderr


def holds(path: Path, pattern: int, offset: int = 0, length: str = "64k") -> bool:
    done = qemu_io(path, f"read -P {pattern:#x} {offset} {length}")
    assert "read" in done.stdout, done.stdout + done.stderr
    return done.returncode == 0 and "verification failed" not in done.stdout


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a file system that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def full_image(tmp_path: Path) -> Path:
    """A 32 MiB disk with every byte written."""
    img = tmp_path / "full.qcow2"
    qcow2.create(img, 32 * MiB)
    write(img, 0xCD, 0, "32M")
    return img


# -- single images ------------------------------------------------------------------------


def test_create_info_resize(tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    qcow2.create(img, 16 * MiB + 1)
    data = qcow2.info(img)
    assert data["format"] == "qcow2" and data["virtual-size"] == 16 * MiB + 512
    assert qcow2.backing_file(img) is None
    assert 0 < qcow2.actual_size(img) < MiB  # sparse
    assert not (tmp_path / "disk.qcow2.tmp").exists()
    with pytest.raises(Conflict):
        qcow2.create(img, MiB)  # qemu-img alone would truncate it

    write(img, 0xAB)
    qcow2.resize(img, 64 * MiB)
    assert qcow2.virtual_size(img) == 64 * MiB and holds(img, 0xAB)
    with pytest.raises(InvalidConfig, match="cannot shrink"):
        qcow2.resize(img, 32 * MiB)
    assert qcow2.virtual_size(img) == 64 * MiB
    qcow2.resize(img, 32 * MiB, shrink=True)
    assert qcow2.virtual_size(img) == 32 * MiB and holds(img, 0xAB)
    assert qcow2.check(img)


def test_missing_images_and_wrong_formats(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        qcow2.info(tmp_path / "nope.qcow2")
    with pytest.raises(InvalidConfig):
        qcow2.create(tmp_path / "x.qcow2")
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    # Never probed: a raw file is an error, not silently a raw disk.
    with pytest.raises(EngineError, match="qemu-img check failed"):
        qcow2.check(raw)
    with pytest.raises(EngineError) as err:
        qcow2.info(raw)
    assert "qemu-img info" in err.value.details["command"]


def test_missing_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HostUnsupported) as err:
        qcow2.create(tmp_path / "x.qcow2", MiB)
    assert err.value.hint == "apt-get install qemu-utils"


def test_info_works_on_an_image_in_use(tmp_path: Path) -> None:
    img = tmp_path / "busy.qcow2"
    qcow2.create(img, 4 * MiB)
    # Interactive qemu-io keeps the image open with QEMU's write lock, as a VM does.
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(img)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Probe only once qemu-io has the image open: a probe while it opens would take a
        # lock of its own first and make qemu-io give up.
        fds = Path(f"/proc/{holder.pid}/fd")
        for _ in range(600):
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) == str(img) for fd in fds.iterdir()):
                    break
            time.sleep(0.05)
        for _ in range(100):
            probe = subprocess.run(
                ["qemu-img", "info", str(img)], capture_output=True, text=True, check=False
            )
            if probe.returncode != 0:
                break
            time.sleep(0.05)
        assert "lock" in probe.stderr
        assert qcow2.virtual_size(img) == 4 * MiB
        assert qcow2.snapshot_list(img) == []
        with pytest.raises(EngineError) as err:
            qcow2.snapshot_create(img, "s1")
        assert err.value.hint is not None and "running QEMU" in err.value.hint
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


# -- internal snapshots -------------------------------------------------------------------


def test_snapshots_with_data(tmp_path: Path) -> None:
    # A comma in the path: --image-opts needs it escaped.
    where = tmp_path / "we,ird"
    where.mkdir()
    img = where / "disk.qcow2"
    qcow2.create(img, 8 * MiB)
    write(img, 0xAB)
    qcow2.snapshot_create(img, "before")
    write(img, 0x11)
    assert holds(img, 0x11) and not holds(img, 0xAB)
    qcow2.snapshot_create(img, "after")

    snaps = qcow2.snapshot_list(img)
    assert [s.name for s in snaps] == ["before", "after"]
    assert snaps[0].created <= snaps[1].created and snaps[0].vm_state_size == 0

    qcow2.snapshot_apply(img, "before")
    assert holds(img, 0xAB)
    qcow2.snapshot_apply(img, "after")
    assert holds(img, 0x11)

    with pytest.raises(Conflict):
        qcow2.snapshot_create(img, "before")
    with pytest.raises(InvalidConfig, match="only digits"):
        qcow2.snapshot_create(img, "1")
    with pytest.raises(InvalidConfig):
        qcow2.snapshot_create(img, "Bad Name")
    with pytest.raises(NotFound) as err:
        qcow2.snapshot_apply(img, "nosuch")
    assert err.value.hint == "its snapshots: before, after"

    qcow2.snapshot_delete(img, "before")
    assert [s.name for s in qcow2.snapshot_list(img)] == ["after"]
    with pytest.raises(NotFound):
        qcow2.snapshot_delete(img, "before")
    assert holds(img, 0x11) and qcow2.check(img)


# -- overlays, copies, rebase, commit -----------------------------------------------------


def test_overlay_and_flatten(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qcow2.create(base, 8 * MiB)
    write(base, 0xAB, 0)
    overlay = tmp_path / "top.qcow2"
    # Relative to the overlay's directory, whatever the working directory is.
    qcow2.create(overlay, backing=Path(base.name))
    assert qcow2.backing_file(overlay) == "base.qcow2"
    assert qcow2.virtual_size(overlay) == 8 * MiB
    write(overlay, 0x22, 65536)
    chain = qcow2.info(overlay, chain=True)
    assert [Path(c["filename"]).name for c in chain] == ["top.qcow2", "base.qcow2"]

    with pytest.raises(NotFound, match="backing image"):
        qcow2.create(tmp_path / "sub" / "x.qcow2", backing=Path("base.qcow2"))

    flat = tmp_path / "out" / "flat.qcow2"
    flat.parent.mkdir()
    qcow2.convert(overlay, flat)
    assert qcow2.backing_file(flat) is None
    base.unlink()  # the copy stands alone
    assert holds(flat, 0xAB, 0) and holds(flat, 0x22, 65536)
    assert not (flat.parent / "flat.qcow2.tmp").exists()
    with pytest.raises(InvalidConfig):
        qcow2.convert(flat, flat)


def test_convert_progress(full_image: Path, tmp_path: Path) -> None:
    seen: list[float] = []
    dst = tmp_path / "copy.qcow2"
    qcow2.convert(full_image, dst, progress=seen.append)
    assert len(seen) >= 3, seen
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] == 1.0 and 0.0 <= seen[0] < 1.0
    assert holds(dst, 0xCD, 0, "32M")

    small = tmp_path / "small.qcow2"
    qcow2.convert(full_image, small, compress=True)
    assert qcow2.actual_size(small) < qcow2.actual_size(dst) // 4
    assert holds(small, 0xCD, 0, "32M")


def test_convert_cancelled_by_progress(full_image: Path, tmp_path: Path) -> None:
    def cancel(fraction: float) -> None:
        raise KeyboardInterrupt

    dst = tmp_path / "copy.qcow2"
    with pytest.raises(KeyboardInterrupt):
        qcow2.convert(full_image, dst, progress=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.qcow2"]


def test_rebase_unsafe(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qcow2.create(base, 4 * MiB)
    write(base, 0xAB)
    top = tmp_path / "top.qcow2"
    qcow2.create(top, backing=Path("base.qcow2"))

    moved = tmp_path / "images" / "base-v1.qcow2"
    moved.parent.mkdir()
    shutil.move(base, moved)
    qcow2.rebase_unsafe(top, Path("images/base-v1.qcow2"))
    assert qcow2.backing_file(top) == "images/base-v1.qcow2"
    assert holds(top, 0xAB)

    qcow2.rebase_unsafe(top, None)
    assert qcow2.backing_file(top) is None
    assert holds(top, 0x00)  # never written in the overlay itself


def test_commit(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qcow2.create(base, 4 * MiB)
    write(base, 0xAB, 0)
    write(base, 0xAB, 65536)
    top = tmp_path / "top.qcow2"
    qcow2.create(top, backing=Path("base.qcow2"))
    write(top, 0x33, 65536)
    assert holds(base, 0xAB, 65536)

    qcow2.commit(top)
    assert holds(base, 0xAB, 0) and holds(base, 0x33, 65536)
    assert holds(top, 0x33, 65536)
    with pytest.raises(InvalidConfig, match="no backing image"):
        qcow2.commit(base)


# -- full disks ---------------------------------------------------------------------------


def test_convert_into_a_full_disk(full_image: Path, small_fs: Path) -> None:
    dst = small_fs / "copy.qcow2"
    with pytest.raises(ResourceExhausted) as err:
        qcow2.convert(full_image, dst, progress=lambda f: None)
    assert err.value.hint and "free some space" in err.value.hint
    assert not dst.exists() and not (small_fs / "copy.qcow2.tmp").exists()
    with pytest.raises(ResourceExhausted):
        qcow2.convert(full_image, dst)
    assert list(small_fs.iterdir()) == []


def test_create_on_a_full_disk(small_fs: Path) -> None:
    (small_fs / "filler").write_bytes(b"x" * 8 * MiB)
    with pytest.raises(ResourceExhausted):
        qcow2.create(small_fs / "new.qcow2", 1024**3)
    assert [p.name for p in small_fs.iterdir()] == ["filler"]


# -- DirPool ------------------------------------------------------------------------------


def test_dir_pool_block_volumes(tmp_path: Path) -> None:
    pool = DirPool(tmp_path / "pool")
    pool.setup()
    path = pool.create_volume("data", 16 * MiB, "block")
    assert path == tmp_path / "pool" / "volumes" / "data.qcow2"
    assert qcow2.virtual_size(path) == 16 * MiB
    assert pool.volumes() == {"data": "block"}
    empty = pool.used_bytes("data", "block")
    write(path, 0xAB, 0, "4M")
    assert pool.used_bytes("data", "block") >= empty + 4 * MiB

    pool.resize_volume("data", 32 * MiB)
    assert qcow2.virtual_size(path) == 32 * MiB
    with pytest.raises(InvalidConfig):
        pool.resize_volume("data", 16 * MiB)

    seen: list[float] = []
    clone = pool.clone_volume("data", "data-copy", "block", progress=seen.append)
    assert clone == pool.volume_path("data-copy", "block") and seen[-1] == 1.0
    assert qcow2.backing_file(clone) is None and holds(clone, 0xAB, 0, "4M")
    write(clone, 0x44)
    assert holds(path, 0xAB)  # independent copies

    pool.delete_volume("data", "block")
    assert not path.exists() and pool.volumes() == {"data-copy": "block"}


def test_dir_pool_filesystem_volumes(tmp_path: Path) -> None:
    pool = DirPool(tmp_path / "pool")
    path = pool.create_volume("share", 64 * MiB, "filesystem")  # no setup(): made on demand
    assert path.is_dir() and path == tmp_path / "pool" / "volumes" / "share"
    (path / "sub").mkdir()
    (path / "sub" / "blob").write_bytes(os.urandom(MiB))
    os.link(path / "sub" / "blob", path / "again")  # a hard link is counted once
    (path / "link").symlink_to("/usr")  # and a symlink is not followed
    used = pool.used_bytes("share", "filesystem")
    assert MiB <= used < 2 * MiB

    pool.resize_volume("share", 128 * MiB)  # advisory in a dir pool

    clone = pool.clone_volume("share", "share2", "filesystem")
    assert (clone / "sub" / "blob").read_bytes() == (path / "sub" / "blob").read_bytes()
    assert (clone / "link").readlink() == Path("/usr")
    assert pool.volumes() == {"share": "filesystem", "share2": "filesystem"}

    pool.delete_volume("share", "filesystem")
    assert not path.exists() and not (tmp_path / "pool" / "volumes" / "share.tmp").exists()
    assert (clone / "again").exists()


def test_dir_pool_names(tmp_path: Path) -> None:
    pool = DirPool(tmp_path / "pool")
    pool.setup()
    pool.create_volume("a", MiB, "block")
    pool.create_volume("b", MiB, "filesystem")
    for content in ("block", "filesystem"):
        for name in ("a", "b"):
            with pytest.raises(Conflict) as conflict:
                pool.create_volume(name, MiB, content)
            assert conflict.value.hint and f"vz volume delete {name}" in conflict.value.hint
    with pytest.raises(Conflict):
        pool.clone_volume("a", "b", "block")

    for call in (
        lambda: pool.delete_volume("zz", "block"),
        lambda: pool.delete_volume("a", "filesystem"),
        lambda: pool.resize_volume("zz", 2 * MiB),
        lambda: pool.clone_volume("zz", "c", "filesystem"),
        lambda: pool.used_bytes("b", "block"),
    ):
        with pytest.raises(NotFound) as missing:
            call()
        assert missing.value.hint == "list volumes: vz volume list"

    for bad in ("../a", "A", "a.qcow2", ""):
        with pytest.raises(InvalidConfig):
            pool.create_volume(bad, MiB, "block")
    assert pool.volumes() == {"a": "block", "b": "filesystem"}


def test_dir_pool_usage_and_setup(tmp_path: Path) -> None:
    pool = DirPool(tmp_path / "pool")
    with pytest.raises(NotFound):
        pool.usage()
    pool.setup()
    total, used, free = pool.usage()
    assert total > 0 and 0 <= used <= total and 0 < free <= total - used
    # Leftovers of an interrupted copy or delete go at the next start.
    (pool.volumes_dir / "x.qcow2.tmp").write_bytes(b"half")
    (pool.volumes_dir / "y.tmp").mkdir()
    (pool.volumes_dir / "y.tmp" / "f").write_bytes(b"half")
    pool.setup()
    assert list(pool.volumes_dir.iterdir()) == []


def test_dir_pool_clones_into_a_full_pool(small_fs: Path, full_image: Path) -> None:
    pool = DirPool(small_fs)
    pool.setup()
    # Compressed, the 32 MiB source fits in the 8 MiB pool; its full copy does not.
    qcow2.convert(full_image, pool.volume_path("src", "block"), compress=True)
    with pytest.raises(ResourceExhausted):
        pool.clone_volume("src", "dst", "block")
    assert pool.volumes() == {"src": "block"}

    share = pool.create_volume("share", MiB, "filesystem")
    (share / "blob").write_bytes(os.urandom(5 * MiB))
    with pytest.raises(ResourceExhausted):
        pool.clone_volume("share", "share2", "filesystem")
    assert sorted(p.name for p in pool.volumes_dir.iterdir()) == ["share", "src.qcow2"]
