"""The daemon's state: one SQLite database (WAL) holding every instance record.

Records are the ``Instance`` model serialised as JSON, with the columns the daemon queries
on (name, state) kept beside it. Only the daemon writes; a single connection is used from
the event loop, and every write is its own short transaction.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vzkit.api.instances import Instance, InstanceState
from vzkit.errors import Conflict, NotFound

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    data TEXT NOT NULL,
    runtime TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS networks (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pools (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (pool, name)
);
CREATE TABLE IF NOT EXISTS trust (name TEXT PRIMARY KEY, data TEXT NOT NULL);
"""


class Database:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def insert(self, inst: Instance, uuid: str, runtime: dict[str, Any] | None = None) -> None:
        try:
            self._conn.execute(
                "INSERT INTO instances(name, uuid, state, data, runtime) VALUES (?, ?, ?, ?, ?)",
                (
                    inst.name,
                    uuid,
                    inst.state.value,
                    inst.model_dump_json(),
                    json.dumps(runtime or {}),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(
                f"an instance named {inst.name!r} already exists",
                hint=f"choose another name, or delete it first: vz delete {inst.name}",
            ) from exc

    def update(self, inst: Instance) -> None:
        cur = self._conn.execute(
            "UPDATE instances SET state = ?, data = ? WHERE name = ?",
            (inst.state.value, inst.model_dump_json(), inst.name),
        )
        if cur.rowcount == 0:
            raise NotFound(f"instance {inst.name!r} not found", hint="list instances: vz list")

    def set_runtime(self, name: str, runtime: dict[str, Any]) -> None:
        self._conn.execute(
            "UPDATE instances SET runtime = ? WHERE name = ?", (json.dumps(runtime), name)
        )

    def get(self, name: str) -> tuple[Instance, str, dict[str, Any]]:
        row = self._conn.execute(
            "SELECT data, uuid, runtime FROM instances WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"instance {name!r} not found", hint="list instances: vz list")
        return Instance.model_validate_json(row[0]), row[1], json.loads(row[2])

    def exists(self, name: str) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM instances WHERE name = ?", (name,)).fetchone()
            is not None
        )

    def list(self, states: AbstractSet[InstanceState] | None = None) -> list[Instance]:
        rows = self._conn.execute("SELECT data FROM instances ORDER BY name").fetchall()
        out = [Instance.model_validate_json(r[0]) for r in rows]
        if states is not None:
            out = [i for i in out if i.state in states]
        return out

    def delete(self, name: str) -> None:
        self._conn.execute("DELETE FROM instances WHERE name = ?", (name,))

    def uuids(self) -> dict[str, str]:
        """Every instance's uuid by name (the network derives link names from them)."""
        return dict(self._conn.execute("SELECT name, uuid FROM instances").fetchall())

    # -- networks ------------------------------------------------------------------------
    # Stored as the network's JSON; vzkit.network.models.NetworkConfig owns the schema.

    def insert_network(self, name: str, data: str) -> None:
        try:
            self._conn.execute("INSERT INTO networks(name, data) VALUES (?, ?)", (name, data))
        except sqlite3.IntegrityError as exc:
            raise Conflict(
                f"a network named {name!r} already exists",
                hint=f"choose another name, or delete it first: vz network delete {name}",
            ) from exc

    def network_rows(self) -> builtins.list[tuple[str, str]]:
        rows = self._conn.execute("SELECT name, data FROM networks ORDER BY name").fetchall()
        return [(r[0], r[1]) for r in rows]

    def update_network(self, name: str, data: str) -> None:
        self._conn.execute("UPDATE networks SET data = ? WHERE name = ?", (data, name))

    def delete_network(self, name: str) -> None:
        self._conn.execute("DELETE FROM networks WHERE name = ?", (name,))

    # -- storage ---------------------------------------------------------------------------
    # Stored as JSON; vzkit.storage.models owns the schema.

    def pool_rows(self) -> builtins.list[tuple[str, str]]:
        rows = self._conn.execute("SELECT name, data FROM pools ORDER BY name").fetchall()
        return [(r[0], r[1]) for r in rows]

    def put_pool(self, name: str, data: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO pools(name, data) VALUES (?, ?)", (name, data))

    def delete_pool(self, name: str) -> None:
        self._conn.execute("DELETE FROM pools WHERE name = ?", (name,))

    def volume_rows(self, pool: str | None = None) -> builtins.list[str]:
        if pool is None:
            rows = self._conn.execute("SELECT data FROM volumes ORDER BY pool, name").fetchall()
        else:
            rows = self._conn.execute(
                "SELECT data FROM volumes WHERE pool = ? ORDER BY name", (pool,)
            ).fetchall()
        return [r[0] for r in rows]

    def put_volume(self, pool: str, name: str, data: str) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO volumes(pool, name, data) VALUES (?, ?, ?)", (pool, name, data)
        )

    def delete_volume(self, pool: str, name: str) -> None:
        self._conn.execute("DELETE FROM volumes WHERE pool = ? AND name = ?", (pool, name))

    # -- remote access ---------------------------------------------------------------------
    # Stored as JSON; vzkit.api.remote owns the schema.

    def trust_rows(self) -> builtins.list[str]:
        return [r[0] for r in self._conn.execute("SELECT data FROM trust ORDER BY name")]

    def put_trust(self, name: str, data: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO trust(name, data) VALUES (?, ?)", (name, data))

    def delete_trust(self, name: str) -> None:
        self._conn.execute("DELETE FROM trust WHERE name = ?", (name,))

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self._conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value)
            )
