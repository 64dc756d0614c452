"""The id map unprivileged containers get, and re-owning an imported container's files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzkit.engines.container.idmap import IdMap, host_idmap, shift_owners
from vzkit.errors import HostUnsupported


def _files(tmp_path: Path, uids: str, gids: str) -> tuple[Path, Path]:
    (tmp_path / "subuid").write_text(uids)
    (tmp_path / "subgid").write_text(gids)
    return tmp_path / "subuid", tmp_path / "subgid"


def test_root_range_from_subuid(tmp_path: Path) -> None:
    uids, gids = _files(
        tmp_path,
        "alice:100000:65536\nroot:1000000:1000000000\n",
        "root:2000000:70000\n",
    )
    m = host_idmap(uids, gids)
    assert m == IdMap(uid=1000000, gid=2000000, size=70000)
    assert m.root == (1000000, 2000000)
    assert m.oci()["uidMappings"] == [{"containerID": 0, "hostID": 1000000, "size": 70000}]
    assert IdMap.parse(m.text()) == m


@pytest.mark.parametrize(
    "content",
    ["", "alice:100000:65536\n", "root:1000000:1000\n", "root:0:65536\n", "root:x:y\n"],
)
def test_no_usable_range_says_how_to_add_one(tmp_path: Path, content: str) -> None:
    uids, gids = _files(tmp_path, content, "root:1000000:1000000000\n")
    with pytest.raises(HostUnsupported) as err:
        host_idmap(uids, gids)
    assert "root:1000000:1000000000" in (err.value.hint or "")
    assert "--privileged" in (err.value.hint or "")


def test_missing_files_are_no_range(tmp_path: Path) -> None:
    with pytest.raises(HostUnsupported):
        host_idmap(tmp_path / "none", tmp_path / "none")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_shift_owners_moves_mapped_ids_and_keeps_setuid(tmp_path: Path) -> None:
    old, new = IdMap(uid=100000, gid=100000, size=65536), IdMap(uid=300000, gid=400000, size=65536)
    tree = tmp_path / "upper"
    (tree / "bin").mkdir(parents=True)
    suid = tree / "bin" / "su"
    suid.write_bytes(b"x")
    os.chown(suid, 100000, 100000 + 5)
    suid.chmod(0o4755)
    (tree / "link").symlink_to("/etc/passwd")
    os.lchown(tree / "link", 100000 + 1000, 100000 + 1000)
    foreign = tree / "foreign"
    foreign.write_bytes(b"")
    os.chown(foreign, 7, 7)  # outside the old map: left as it is
    os.chown(tree, 100000, 100000)
    os.chown(tree / "bin", 100000, 100000)
    shift_owners(tree, old, new)
    st = suid.stat()
    assert (st.st_uid, st.st_gid) == (300000, 400005) and st.st_mode & 0o7777 == 0o4755
    lst = os.lstat(tree / "link")
    assert (lst.st_uid, lst.st_gid) == (301000, 401000)
    assert Path("/etc/passwd").stat().st_uid == 0  # the link was not followed
    assert (foreign.stat().st_uid, tree.stat().st_uid) == (7, 300000)
    shift_owners(tree, new, None)  # to host ids: a privileged container's
    assert suid.stat().st_uid == 0 and suid.stat().st_mode & 0o4000
