"""The Debian builder's host-facing parts: mirror discovery and rootfs customization."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzkit.errors import HostUnsupported
from vzkit.images.debian import _lock_root, apt_mirrors


def test_mirrors_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: https://other.example/node\nSuites: nodistro\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "cloud.list").write_text(
        "deb [signed-by=/x.gpg] https://cloud.example/apt cloud-sdk-bookworm main\n"
    )
    assert apt_mirrors(tmp_path) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]


def test_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64] http://m.example/debian bookworm main contrib\n"
    )
    assert apt_mirrors(tmp_path) == ["deb http://m.example/debian bookworm main contrib"]


def test_no_bookworm_mirror_is_host_unsupported(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://m.example/debian bullseye main\n")
    with pytest.raises(HostUnsupported, match="bookworm"):
        apt_mirrors(tmp_path)


def test_lock_root(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    _lock_root(shadow)
    _lock_root(shadow)
    assert shadow.read_text().splitlines()[0] == "root:!*:19000:0:99999:7:::"
    assert shadow.read_text().splitlines()[1] == "daemon:*:19000:0:99999:7:::"
