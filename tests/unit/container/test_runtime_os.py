"""vzkit_runtime._os (os without importing os) agrees with os and posixpath."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pytest

from vzkit_runtime import _os

PATHS = [
    "", ".", "..", "/", "//", "///", "a", "a/", "/a", "/a/", "a/b", "/a/b/", "a//b", "/a/./b",
    "/a/../b", "../a", "a/..", "/..", "/../a", "a/b/../../..", "//a/b", "///a", "/a/b/.",
]  # fmt: skip


@pytest.mark.parametrize("p", PATHS)
def test_lexical_functions(p: str) -> None:
    assert _os.path.normpath(p) == posixpath.normpath(p)
    assert _os.path.split(p) == posixpath.split(p)
    assert _os.path.dirname(p) == posixpath.dirname(p)
    assert _os.path.basename(p) == posixpath.basename(p)
    if p:
        assert _os.path.abspath(p) == posixpath.abspath(p)
        assert _os.path.relpath(p, "/a/c") == posixpath.relpath(p, "/a/c")


@pytest.mark.parametrize(
    "parts", [("a", "b"), ("a/", "b"), ("a", "/b"), ("", "b"), ("/", "a", "", "c"), ("a",)]
)
def test_join(parts: tuple[str, ...]) -> None:
    assert _os.path.join(*parts) == posixpath.join(*parts)


def test_realpath_and_predicates(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "f").write_text("x")
    (tmp_path / "abs").symlink_to(tmp_path / "d")
    (tmp_path / "rel").symlink_to("d/e/..")
    (tmp_path / "up").symlink_to("../" * 20 + str(tmp_path).lstrip("/"))
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("nowhere/x")
    (tmp_path / "deep").symlink_to("d/e")
    names = ("abs", "rel", "up", "abs/e/../e", "rel/e", "missing/x", "dangling", "loop", "f",
             "deep/..", "deep/../e", "f/x")  # fmt: skip
    for name in names:
        p = str(tmp_path / name)
        assert _os.path.realpath(p) == os.path.realpath(p), name
        assert _os.path.exists(p) == os.path.exists(p), name
        assert _os.path.lexists(p) == os.path.lexists(p), name
        assert _os.path.isdir(p) == os.path.isdir(p), name
        assert _os.path.isfile(p) == os.path.isfile(p), name
        assert _os.path.islink(p) == os.path.islink(p), name
    assert _os.path.getsize(str(tmp_path / "f")) == 1


def test_resolve_stays_in_its_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "abs").symlink_to("/etc")
    (tmp_path / "up").symlink_to("../../../../etc")
    (tmp_path / "loop").symlink_to("loop")
    root = str(tmp_path)
    for name in ("/abs/passwd", "up/passwd", "/../../etc/passwd"):
        assert _os.resolve(root, name) == f"{root}/etc/passwd"
    with pytest.raises(OSError, match="too many levels"):
        _os.resolve(root, "/loop", strict=True)
    assert _os.resolve(root, "/loop") == f"{root}/loop"
    assert _os.resolve("/", "/") == "/"


def test_makedirs_and_walk(tmp_path: Path) -> None:
    _os.makedirs(str(tmp_path / "x" / "y" / "z"), 0o755)
    _os.makedirs(str(tmp_path / "x" / "y"), exist_ok=True)
    with pytest.raises(FileExistsError):
        _os.makedirs(str(tmp_path / "x"))
    (tmp_path / "x" / "file").write_text("")
    assert list(_os.walk(str(tmp_path / "x"))) == list(os.walk(tmp_path / "x"))
    assert _os.fsencode("é") == os.fsencode("é")
