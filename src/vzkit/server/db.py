"""The daemon's state: one SQLite database (WAL) holding every instance record.

Records are the ``Instance`` model serialised as JSON, with the columns the daemon queries
on (name, state) kept beside it, and the engine's own state (JSON its engine reads, in the
``runtime`` column). Only the daemon writes; a single connection is used from the event
loop, and every write is its own short transaction.

Instance records are also kept in memory, validated, after their first read: every write
goes to SQLite first and then replaces the cached record, so the cache never holds what
the database does not (and a restarted daemon starts from the database). Records handed
out are shared: callers never change them in place (``model_copy(update=...)``).
"""

from __future__ import annotations

import builtins
import os
import sqlite3
import threading
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from vzkit.api.instances import Instance, InstanceState
from vzkit.errors import Conflict, NotFound

# 2: instance records name their security mode (containers from before 2 ran as host root).
SCHEMA_VERSION = 2

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


class StoredInstance(NamedTuple):
    instance: Instance
    uuid: str
    runtime: str  # the engine's state, as JSON


class Database:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Private: SQLite gives the -wal and -shm files it creates the database's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        self._migrate()
        self._rows: dict[str, StoredInstance] | None = None
        self._sorted: list[Instance] | None = None
        self._generation = 0
        # Threads read (network sync runs in one); the event loop writes.
        self._cache_lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        (version,) = self._conn.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
        if int(version) >= SCHEMA_VERSION:
            return
        with self.transaction() as conn:
            # Loading a record without "security" marks a container privileged (it ran as
            # host root, and its files are host root's); storing it says so for good.
            for name, data in conn.execute("SELECT name, data FROM instances").fetchall():
                record = Instance.model_validate_json(data).model_dump_json()
                conn.execute("UPDATE instances SET data = ? WHERE name = ?", (record, name))
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- instances -------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Grows with every change to an instance record (for caches of derived data)."""
        return self._generation

    def _cache(self) -> dict[str, StoredInstance]:
        with self._cache_lock:
            if self._rows is None:
                rows = self._conn.execute("SELECT data, uuid, runtime FROM instances").fetchall()
                self._rows = {
                    (inst := Instance.model_validate_json(r[0])).name: StoredInstance(
                        inst, r[1], r[2]
                    )
                    for r in rows
                }
            return self._rows

    def _cached(self, name: str, row: StoredInstance | None) -> None:
        rows = self._cache()
        with self._cache_lock:
            if row is None:
                rows.pop(name, None)
            else:
                rows[name] = row
            self._sorted = None
            self._generation += 1

    def insert(self, inst: Instance, uuid: str, runtime: str = "{}") -> None:
        data = inst.model_dump_json()
        try:
            self._conn.execute(
                "INSERT INTO instances(name, uuid, state, data, runtime) VALUES (?, ?, ?, ?, ?)",
                (inst.name, uuid, inst.state.value, data, runtime),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(
                f"an instance named {inst.name!r} already exists",
                hint=f"choose another name, or delete it first: vz delete {inst.name}",
            ) from exc
        # The cache holds its own copy, parsed from what was stored.
        self._cached(inst.name, StoredInstance(Instance.model_validate_json(data), uuid, runtime))

    def update(self, inst: Instance) -> None:
        data = inst.model_dump_json()
        cur = self._conn.execute(
            "UPDATE instances SET state = ?, data = ? WHERE name = ?",
            (inst.state.value, data, inst.name),
        )
        if cur.rowcount == 0:
            raise NotFound(f"instance {inst.name!r} not found", hint="list instances: vz list")
        old = self.get(inst.name)
        self._cached(inst.name, old._replace(instance=Instance.model_validate_json(data)))

    def set_runtime(self, name: str, runtime: str) -> None:
        cur = self._conn.execute("UPDATE instances SET runtime = ? WHERE name = ?", (runtime, name))
        if cur.rowcount:
            self._cached(name, self.get(name)._replace(runtime=runtime))

    def get(self, name: str) -> StoredInstance:
        row = self._cache().get(name)
        if row is None:
            raise NotFound(f"instance {name!r} not found", hint="list instances: vz list")
        return row

    def exists(self, name: str) -> bool:
        return name in self._cache()

    def list(self, states: AbstractSet[InstanceState] | None = None) -> builtins.list[Instance]:
        rows = self._cache()
        with self._cache_lock:
            if self._sorted is None:
                self._sorted = [rows[name].instance for name in sorted(rows)]
            out = self._sorted
        if states is not None:
            return [i for i in out if i.state in states]
        return list(out)

    def delete(self, name: str) -> None:
        self._conn.execute("DELETE FROM instances WHERE name = ?", (name,))
        self._cached(name, None)

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
