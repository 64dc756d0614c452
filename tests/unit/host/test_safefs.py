"""safefs: no helper follows a link or leaves its directory, with openat2 and without."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.host import safefs


@pytest.fixture(params=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "walk":
        monkeypatch.setattr(safefs, "_have_openat2", False)
    yield request.param


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with a file, a subdir, and links to a host file and directory outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file").write_text("inside")
    (root / "link").symlink_to(outside / "secret")
    (root / "dirlink").symlink_to(outside)
    (root / "rel").symlink_to("sub/file")
    os.mkfifo(root / "fifo")
    return root


def _errno(exc: pytest.ExceptionInfo[OSError]) -> int:
    return exc.value.errno or 0


def test_reads_inside_and_refuses_links(tree: Path, mode: str) -> None:
    assert safefs.read_text(tree, "sub/file") == "inside"
    for rel in ("link", "dirlink/secret", "rel"):
        with pytest.raises(OSError) as exc:
            safefs.read_bytes(tree, rel, 100)
        assert _errno(exc) in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV), rel
    for rel in ("../outside/secret", "/etc/passwd", "sub/../../outside/secret"):
        with pytest.raises(OSError) as exc:
            safefs.read_bytes(tree, rel, 100)
        assert _errno(exc) == errno.EXDEV


def test_a_fifo_or_an_oversized_file_is_refused_without_blocking(tree: Path, mode: str) -> None:
    with pytest.raises(OSError) as exc:
        safefs.read_bytes(tree, "fifo", 100)
    assert _errno(exc) == errno.EINVAL
    with pytest.raises(OSError) as exc:
        safefs.read_bytes(tree, "sub/file", 3)
    assert _errno(exc) == errno.EFBIG


def test_writes_replace_a_link_and_never_write_through_it(tree: Path, mode: str) -> None:
    secret = tree.parent / "outside" / "secret"
    safefs.replace_bytes(tree, "link", b"new", 0o640)
    assert secret.read_text() == "host secret"
    assert not (tree / "link").is_symlink() and (tree / "link").read_bytes() == b"new"
    assert stat.S_IMODE((tree / "link").stat().st_mode) == 0o640
    with pytest.raises(OSError):
        safefs.replace_bytes(tree, "dirlink/secret", b"x")
    assert secret.read_text() == "host secret"
    assert not [p for p in tree.iterdir() if p.name.endswith(".tmp")]


def test_truncate_chown_and_unlink_touch_the_link_not_its_target(tree: Path, mode: str) -> None:
    secret = tree.parent / "outside" / "secret"
    with pytest.raises(OSError):
        safefs.truncate(tree, "link")
    assert secret.read_text() == "host secret"
    before = secret.stat()
    # Giving a file away takes root; otherwise to our own ids, which still shows the link's
    # target is not the one changed (its times would move).
    uid = 1234 if os.geteuid() == 0 else os.geteuid()
    safefs.chown(tree, "link", uid, uid if os.geteuid() == 0 else os.getegid())
    assert secret.stat().st_uid == before.st_uid and secret.stat().st_ctime == before.st_ctime
    assert (tree / "link").lstat().st_uid == uid
    safefs.truncate(tree, "sub/new.log", 0o600)
    assert (tree / "sub" / "new.log").read_bytes() == b""
    safefs.unlink(tree, "link")
    assert secret.exists() and not (tree / "link").is_symlink()
    safefs.unlink(tree, "missing")


def test_lstat_exists_and_dirs(tree: Path, mode: str) -> None:
    assert safefs.exists(tree, "sub/file")
    assert not safefs.exists(tree, "link") and not safefs.exists(tree, "dirlink/secret")
    assert safefs.exists(tree, "sub", stat.S_IFDIR)
    st = safefs.lstat(tree, "link")
    assert st is not None and stat.S_ISLNK(st.st_mode)
    with safefs.dir_fd(tree, "a/b", create=True) as fd:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    assert (tree / "a" / "b").is_dir()
    with pytest.raises(OSError), safefs.dir_fd(tree, "dirlink/x", create=True):
        pass
    assert not (tree.parent / "outside" / "x").exists()


def test_walk_and_tree_size_never_follow(tree: Path, tmp_path: Path) -> None:
    (tree / "proc").symlink_to("/proc/1/root/etc")
    names = {rel for rel, _ in safefs.walk(tree)}
    assert "sub/file" in names and "dirlink" in names and "dirlink/secret" not in names
    assert safefs.tree_size(tree) == len("inside")
    assert safefs.tree_size(tree, allocated=True) > 0
    assert safefs.tree_size(tree / "dirlink") == 0
    assert safefs.tree_size(tmp_path / "missing") == 0
