"""The daemon identity kept in the state dir, and the cgroup paths that carry it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from vzkit.errors import InvalidConfig
from vzkit.settings import Settings


def _settings(state: Path) -> Settings:
    return Settings(state_dir=state, cgroup_parent="vzkit")


def _read_id(state: str) -> str:
    return Settings(state_dir=Path(state)).daemon_id


def test_identity_is_made_once_and_kept(tmp_path: Path) -> None:
    first = _settings(tmp_path / "a").daemon_id
    assert len(first) == 8 and int(first, 16) >= 0
    # Stable across restarts (a new Settings reads the same file)...
    assert _settings(tmp_path / "a").daemon_id == first
    # ... and another state dir is another daemon.
    assert _settings(tmp_path / "b").daemon_id != first
    assert not _settings(tmp_path / "a").predates_identity


def test_processes_starting_at_once_agree_on_one_identity(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        ids = pool.map(_read_id, [str(tmp_path / "s")] * 16)
    assert len(set(ids)) == 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["daemon-id"]


def test_a_state_dir_with_a_database_predates_identities(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "vzkit.db").write_bytes(b"")
    s = _settings(tmp_path / "old")
    assert s.predates_identity and _settings(tmp_path / "old").daemon_id == s.daemon_id


def test_cgroups_carry_the_identity(tmp_path: Path) -> None:
    a, b = _settings(tmp_path / "a"), _settings(tmp_path / "b")
    assert a.instance_cgroup("web") == f"vzkit/{a.daemon_id}/web"
    assert a.instance_cgroup("web") != b.instance_cgroup("web")


def test_a_damaged_identity_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("daemon-id").write_text("not-hex\n")
    with pytest.raises(InvalidConfig, match="daemon identity"):
        _ = _settings(tmp_path).daemon_id
