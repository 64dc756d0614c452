"""The instance records' cache: what it serves is always what the database holds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from vzkit.api.instances import Instance, InstanceState, InstanceType, Limits
from vzkit.errors import Conflict, NotFound
from vzkit.server.db import Database


def _inst(name: str, state: InstanceState = InstanceState.STOPPED) -> Instance:
    return Instance(
        name=name,
        type=InstanceType.VM,
        image="minimal",
        limits=Limits(),
        state=state,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _fresh(path: Path) -> list[tuple[Instance, str, str]]:
    """What another reader of the file sees (no cache of its own yet)."""
    other = Database(path)
    try:
        return [tuple(other.get(i.name)) for i in other.list()]  # type: ignore[misc]
    finally:
        other.close()


def test_every_write_goes_to_the_database_and_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = Database(path)
    db.list()  # the cache is loaded: later writes must keep it right
    db.insert(_inst("b"), "u-b")
    db.insert(_inst("a"), "u-a", '{"top": "x"}')
    db.update(_inst("b", InstanceState.RUNNING))
    db.set_runtime("b", '{"lower": "/l"}')
    db.insert(_inst("c"), "u-c")
    db.delete("c")
    cached = [tuple(db.get(i.name)) for i in db.list()]
    assert cached == _fresh(path)
    assert [i.name for i in db.list()] == ["a", "b"]
    assert db.get("b").instance.state is InstanceState.RUNNING
    assert db.get("b").runtime == '{"lower": "/l"}'
    assert [i.name for i in db.list({InstanceState.RUNNING})] == ["b"]
    assert not db.exists("c")
    with pytest.raises(NotFound):
        db.get("c")
    db.close()


def test_a_refused_write_changes_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")
    db.insert(_inst("a"), "u-a")
    before = db.generation
    with pytest.raises(Conflict):
        db.insert(_inst("a", InstanceState.RUNNING), "u-other")
    with pytest.raises(NotFound):
        db.update(_inst("ghost"))
    assert db.generation == before
    assert db.get("a").instance.state is InstanceState.STOPPED and db.get("a").uuid == "u-a"
    db.close()


def test_the_cache_keeps_its_own_copy(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")
    inst = _inst("a")
    db.insert(inst, "u-a")
    inst.ports.append(inst.ports[0] if inst.ports else None)  # type: ignore[arg-type]
    assert db.get("a").instance.ports == []
    listed = db.list()
    listed.clear()
    assert [i.name for i in db.list()] == ["a"]
    db.close()


def test_the_generation_counts_changes_only(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")
    start = db.generation
    db.insert(_inst("a"), "u-a")
    db.list()
    db.get("a")
    assert db.generation == start + 1
    db.update(_inst("a", InstanceState.RUNNING))
    db.set_runtime("a", "{}")
    db.delete("a")
    assert db.generation == start + 4
    db.close()
