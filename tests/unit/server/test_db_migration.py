"""Schema 1 -> 2: containers recorded before user namespaces stay privileged."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from vzkit.server.db import SCHEMA_VERSION, Database


def _record(name: str, kind: str) -> str:
    return json.dumps(
        {
            "name": name,
            "type": kind,
            "image": "minimal",
            "limits": {"cpus": 1, "memory": 64 * 2**20},
            "state": "stopped",
            "created_at": "2024-01-01T00:00:00Z",
        }
    )


def test_old_container_rows_become_privileged(tmp_path: Path) -> None:
    path = tmp_path / "vzkit.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    for i, (name, kind) in enumerate((("old", "container"), ("vm", "microvm"))):
        conn.execute(
            "INSERT INTO instances(name, uuid, state, data) VALUES (?, ?, 'stopped', ?)",
            (name, f"u{i}", _record(name, kind)),
        )
    conn.commit()
    conn.close()
    db = Database(path)
    try:
        stored = dict(db._conn.execute("SELECT name, data FROM instances").fetchall())
        assert json.loads(stored["old"])["security"] == {"privileged": True}
        assert json.loads(stored["vm"])["security"] == {"privileged": False}
        assert db.get("old").instance.security.privileged
        (version,) = db._conn.execute(
            "SELECT value FROM meta WHERE key='schema_version'"
        ).fetchone()
        assert int(version) == SCHEMA_VERSION == 2
    finally:
        db.close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_new_database_needs_no_migration(tmp_path: Path) -> None:
    db = Database(tmp_path / "vzkit.db")
    try:
        (version,) = db._conn.execute(
            "SELECT value FROM meta WHERE key='schema_version'"
        ).fetchone()
        assert int(version) == SCHEMA_VERSION
    finally:
        db.close()
