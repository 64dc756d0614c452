"""Background operations: a long request answered at once (202) and followed by its id.

Any route that takes ``?background=true`` hands its work to :meth:`Operations.submit` and
answers with the :class:`Operation`; ``GET /1.0/operations/ID/wait`` blocks until it is
done. Operations live in the daemon's memory (a restarted vzd knows none: the instance
records say what became of them); the last 1000 finished ones are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

from vzkit.api.operations import Operation, OperationStatus
from vzkit.errors import NotFound, VzError
from vzkit.server.events import EventBus

__all__ = ["Operations"]

_KEEP = 1000


class Operations:
    def __init__(self, events: EventBus) -> None:
        self.events = events
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def submit(self, kind: str, resource: str | None, work: Awaitable[Any]) -> Operation:
        now = datetime.now(UTC)
        op = Operation(
            id=uuid.uuid4().hex, kind=kind, resource=resource, created_at=now, updated_at=now
        )
        self._ops[op.id] = op
        self._tasks[op.id] = asyncio.create_task(self._run(op, work))
        return op

    async def _run(self, op: Operation, work: Awaitable[Any]) -> None:
        try:
            result = await work
        except asyncio.CancelledError:
            self._finish(
                op, OperationStatus.CANCELLED, error={"error": "cancelled", "code": "cancelled"}
            )
            raise
        except VzError as exc:
            self._finish(op, OperationStatus.FAILURE, error=exc.to_dict())
        except Exception as exc:
            err = {"error": f"internal error: {type(exc).__name__}: {exc}", "code": "internal"}
            self._finish(op, OperationStatus.FAILURE, error=err)
        else:
            dump = getattr(result, "model_dump", None)
            value = dump(mode="json") if dump is not None else result
            self._finish(op, OperationStatus.SUCCESS, result=value)
        finally:
            self._tasks.pop(op.id, None)

    def _finish(self, op: Operation, status: OperationStatus, **fields: Any) -> None:
        op.status = status
        op.updated_at = datetime.now(UTC)
        for key, value in fields.items():
            setattr(op, key, value)
        self.events.publish(
            "operation-done", op.resource, id=op.id, kind=op.kind, status=status.value
        )
        finished = [i for i, o in self._ops.items() if o.status is not OperationStatus.RUNNING]
        for old in finished[: max(0, len(finished) - _KEEP)]:
            del self._ops[old]

    def all(self) -> list[Operation]:
        return list(self._ops.values())

    def get(self, op_id: str) -> Operation:
        op = self._ops.get(op_id)
        if op is None:
            raise NotFound(
                f"operation {op_id!r} not found",
                hint="operations are kept in vzd's memory: a restart forgets them "
                "(the instance's own state says how it ended)",
            )
        return op

    async def wait(self, op_id: str, timeout: float | None) -> Operation:
        """The operation once done, or as it is when ``timeout`` runs out."""
        op = self.get(op_id)
        task = self._tasks.get(op_id)
        if task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return op

    async def cancel(self, op_id: str) -> Operation:
        op = self.get(op_id)
        task = self._tasks.get(op_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return op
