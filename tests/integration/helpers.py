"""Small helpers for integration tests."""

from __future__ import annotations

import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vzkit.api.instances import InstanceState
from vzkit.server.db import Database

if TYPE_CHECKING:
    from tests.conftest import Daemon
    from vzkit.sdk.client import Client


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


def sh(c: Client, name: str, script: str, timeout: float = 60) -> str:
    """stdout of ``sh -c script`` in an instance, which must succeed."""
    res, out, err = c.exec_capture(name, ["sh", "-c", script], timeout=timeout)
    assert res.exit_code == 0, (script, (out + err).decode())
    return out.decode()


def compile_static(tmp: Path, name: str, source: str) -> Path:
    """``source`` (C) built as ``tmp/name``, statically linked: it runs in any rootfs."""
    (tmp / f"{name}.c").write_text(textwrap.dedent(source))
    out = tmp / name
    subprocess.run(["gcc", "-O2", "-static", "-o", str(out), str(tmp / f"{name}.c")], check=True)
    return out
