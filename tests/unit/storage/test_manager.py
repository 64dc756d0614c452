"""StorageManager: a pool path the daemon cannot use is a user error, not a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzkit.api.storage import PoolConfig
from vzkit.errors import InvalidConfig
from vzkit.server.db import Database
from vzkit.settings import Settings
from vzkit.storage.manager import StorageManager


@pytest.fixture
def manager(tmp_path: Path) -> StorageManager:
    return StorageManager(Settings(state_dir=tmp_path / "state"), Database(tmp_path / "db"))


def test_pool_paths_the_daemon_cannot_use(manager: StorageManager, tmp_path: Path) -> None:
    # Each was an OSError out of the API (a 500) before; the API fuzz test found them.
    file = tmp_path / "file"
    file.write_text("")
    for path in (file, file / "below", tmp_path / ("x" * 300)):
        with pytest.raises(InvalidConfig, match=r"cannot use .* as a pool directory"):
            manager.create_pool(PoolConfig(name="p", path=path))
    assert [p.name for p in manager.pools()] == ["default"]


def test_pool_in_a_new_directory(manager: StorageManager, tmp_path: Path) -> None:
    pool = manager.create_pool(PoolConfig(name="p", path=tmp_path / "a" / "b"))
    assert pool.path == tmp_path / "a" / "b" and (tmp_path / "a" / "b" / "volumes").is_dir()
