"""Background operations, and the event stream."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from vzkit.api.operations import Operation
from vzkit.server.routers.common import API, ERRORS, Events, Ops

router = APIRouter()
events_router = APIRouter()


@router.get(f"{API}/operations", responses=ERRORS)
async def list_operations(operations: Ops) -> list[Operation]:
    return operations.all()


@router.get(f"{API}/operations/{{op_id}}", responses=ERRORS)
async def get_operation(op_id: str, operations: Ops) -> Operation:
    return operations.get(op_id)


@router.get(f"{API}/operations/{{op_id}}/wait", responses=ERRORS)
async def wait_operation(
    op_id: str, operations: Ops, timeout: float | None = Query(None, gt=0, le=3600)
) -> Operation:
    return await operations.wait(op_id, timeout)


@router.delete(f"{API}/operations/{{op_id}}", responses=ERRORS)
async def cancel_operation(op_id: str, operations: Ops) -> Operation:
    return await operations.cancel(op_id)


@events_router.websocket(f"{API}/events")
async def events_ws(ws: WebSocket, events: Events, type: str | None = None) -> None:
    """Lifecycle events as JSON text messages, from now on; ``?type=a,b`` filters."""
    await ws.accept()
    types = {t for t in (type or "").split(",") if t} or None
    stream = events.subscribe(types)

    async def closed() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass

    watcher = asyncio.create_task(closed())
    try:
        while not watcher.done():
            nxt = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                break
            await ws.send_text(nxt.result().model_dump_json())
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        watcher.cancel()
        await stream.aclose()
