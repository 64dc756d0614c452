"""Small helpers for integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vzkit.api.instances import InstanceState
from vzkit.server.db import Database

if TYPE_CHECKING:
    from tests.conftest import Daemon


def wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def recorded_state(d: Daemon, name: str) -> InstanceState:
    """An instance's state as the daemon recorded it, read from its database: what the
    daemon noticed by itself, with no request that could make it look."""
    db = Database(d.settings.db_path)
    try:
        return db.get(name)[0].state
    finally:
        db.close()
