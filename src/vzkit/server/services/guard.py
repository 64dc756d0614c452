"""What every service shares: the engines by instance type, and the instance guard.

The guard is the one way to an instance record: it takes the instance's lock, loads an
:class:`InstanceRecord` (the instance, its uuid and its engine's typed state), saves
changes and publishes the state event. An operation on an instance holds its lock from
its state check to its last save, so two operations never interleave on one instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from vzkit.api.instances import Instance, InstanceState, InstanceType
from vzkit.engines.base import Capabilities, Engine, EngineState
from vzkit.errors import InvalidConfig
from vzkit.server.db import Database
from vzkit.server.events import EventBus


class Engines:
    """The daemon's engines, by the instance type each runs."""

    def __init__(self, by_type: dict[InstanceType, Engine]) -> None:
        self._by_type = by_type

    def of(self, kind: InstanceType) -> Engine:
        engine = self._by_type.get(kind)
        if engine is None:
            raise InvalidConfig(
                f"instances of type {kind.value!r} are not supported by this daemon",
                hint="use --type " + " or ".join(t.value for t in self._by_type),
            )
        return engine

    def caps(self, kind: InstanceType) -> Capabilities:
        return self.of(kind).capabilities(kind)

    def supports(self, kind: InstanceType) -> bool:
        return kind in self._by_type

    def all(self) -> Iterable[Engine]:
        """Each engine once (one may run several types)."""
        return {id(e): e for e in self._by_type.values()}.values()


@dataclass(frozen=True)
class InstanceRecord:
    instance: Instance
    uuid: str
    engine_state: EngineState

    @property
    def name(self) -> str:
        return self.instance.name


class InstanceGuard:
    def __init__(self, db: Database, engines: Engines, events: EventBus) -> None:
        self.db = db
        self.engines = engines
        self.events = events
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[InstanceRecord]:
        """The instance's lock, and its record as it is once the lock is taken."""
        async with self.lock(name):
            yield self.load(name)

    def load(self, name: str) -> InstanceRecord:
        inst, uuid, runtime = self.db.get(name)
        return InstanceRecord(inst, uuid, self.engines.of(inst.type).load_state(runtime))

    def get(self, name: str) -> Instance:
        return self.db.get(name).instance

    def find(self, name: str) -> tuple[Instance, str]:
        """The instance and its uuid, without its engine state (readers need no lock)."""
        inst, uuid, _ = self.db.get(name)
        return inst, uuid

    def uuid(self, name: str) -> str:
        return self.db.get(name).uuid

    def exists(self, name: str) -> bool:
        return self.db.exists(name)

    def instances(self, states: AbstractSet[InstanceState] | None = None) -> list[Instance]:
        return self.db.list(states)

    @property
    def generation(self) -> int:
        """Grows with every change to any instance record."""
        return self.db.generation

    def save(self, inst: Instance, **changes: Any) -> Instance:
        """Store ``inst`` with ``changes``; a new state is published as an event."""
        new = inst.model_copy(update=changes)
        self.db.update(new)
        if new.state is not inst.state:
            self.events.publish(
                "instance-state",
                new.name,
                state=new.state.value,
                previous=inst.state.value,
                reason=new.reason,
            )
        return new

    def revert(self, inst: Instance) -> None:
        """Put back a record saved moments ago, without an event (its state is unchanged)."""
        self.db.update(inst)

    def save_engine_state(self, name: str, state: EngineState) -> None:
        self.db.set_runtime(name, state.dump())

    def insert(self, inst: Instance, uuid: str, state: EngineState | None = None) -> None:
        self.db.insert(inst, uuid, state.dump() if state is not None else "{}")

    def remove(self, name: str) -> None:
        """Delete the record (its lock goes with the last holder: :meth:`forget`)."""
        self.db.delete(name)

    def forget(self, name: str) -> None:
        self._locks.pop(name, None)
