"""Instances: records, state changes, limits, files, the console and exec."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from vzkit.api.bounds import OutOfBounds, parse_file_mode
from vzkit.api.instances import ExecRequest, Instance, InstanceCreate, InstanceUpdate, StateChange
from vzkit.engines.base import ExecSession
from vzkit.errors import InvalidConfig, VzError
from vzkit.server.routers.common import API, BG, ERRORS, Bg, Instances, validation_message, ws_error

router = APIRouter()


@router.get(f"{API}/instances", response_model=list[Instance], responses=ERRORS)
async def list_instances(instances: Instances) -> Response:
    # Serialised once per change of any record, not per request.
    return Response(instances.list_json(), media_type="application/json")


@router.post(f"{API}/instances", status_code=201, response_model=Instance, responses=BG)
async def create_instance(
    req: InstanceCreate, instances: Instances, bg: Bg, background: bool = False
) -> Any:
    return await bg.run(background, "instance-create", req.name, instances.create(req))


@router.get(f"{API}/instances/{{name}}", responses=ERRORS)
async def get_instance(name: str, instances: Instances) -> Instance:
    return instances.get(name)


@router.delete(f"{API}/instances/{{name}}", status_code=204, response_model=None, responses=BG)
async def delete_instance(
    name: str, instances: Instances, bg: Bg, force: bool = False, background: bool = False
) -> Any:
    if background:
        return await bg.run(True, "instance-delete", name, instances.delete(name, force=force))
    await instances.delete(name, force=force)
    return Response(status_code=204)


@router.patch(f"{API}/instances/{{name}}", responses=ERRORS)
async def update_instance(name: str, change: InstanceUpdate, instances: Instances) -> Instance:
    return await instances.update(name, change)


@router.put(f"{API}/instances/{{name}}/state", response_model=Instance, responses=BG)
async def change_state(
    name: str, change: StateChange, instances: Instances, bg: Bg, background: bool = False
) -> Any:
    work = instances.change_state(name, change)
    return await bg.run(background, f"instance-{change.action.value}", name, work)


@router.get(f"{API}/instances/{{name}}/console/log", responses=ERRORS)
async def console_log(name: str, instances: Instances) -> Response:
    return Response(instances.console_log(name), media_type="text/plain")


@router.put(f"{API}/instances/{{name}}/files", status_code=204, responses=ERRORS)
async def push_file(
    name: str,
    request: Request,
    instances: Instances,
    path: str = Query(...),
    mode: str = "0644",
    parents: bool = False,
    allow_setid: bool = False,
) -> Response:
    try:
        mode_int = parse_file_mode(mode, allow_setid=allow_setid)
    except OutOfBounds as exc:
        raise InvalidConfig(str(exc), hint=exc.hint) from None
    await instances.push_file(name, path, request.stream(), mode_int, parents)
    return Response(status_code=204)


@router.get(f"{API}/instances/{{name}}/files", responses=ERRORS)
async def pull_file(name: str, instances: Instances, path: str = Query(...)) -> StreamingResponse:
    mode, chunks = await instances.pull_file(name, path)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"X-Vz-File-Mode": f"{mode & 0o7777:04o}"},
    )


@router.websocket(f"{API}/instances/{{name}}/exec")
async def exec_ws(ws: WebSocket, name: str, instances: Instances) -> None:
    await ws.accept()
    try:
        req = ExecRequest.model_validate_json(await ws.receive_text())
        session = await instances.exec(name, req)
    except ValidationError as exc:
        await ws_error(ws, InvalidConfig(validation_message(exc)))
        return
    except VzError as exc:
        await ws_error(ws, exc)
        return
    except WebSocketDisconnect:
        return
    await _relay_exec(ws, session)


@router.websocket(f"{API}/instances/{{name}}/console")
async def console_ws(ws: WebSocket, name: str, instances: Instances, history: bool = False) -> None:
    await ws.accept()
    try:
        stream = await instances.open_console(name)
    except VzError as exc:
        await ws_error(ws, exc)
        return
    if history:
        await ws.send_bytes(instances.console_log(name))

    async def pump_out() -> None:
        while data := await stream.read(65536):
            await ws.send_bytes(data)

    out = asyncio.create_task(pump_out())
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            if msg.get("bytes"):
                await stream.write(msg["bytes"])
    finally:
        out.cancel()
        await stream.close()


async def _pump_in(ws: WebSocket, session: ExecSession) -> None:
    """The client's input, end of input, signals and terminal sizes, to the command."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            # The client went away: do not leave its command running in the guest.
            await session.signal(9)
            return
        data = msg.get("bytes")
        if data is not None:
            if data[:1] == b"\x00":
                if len(data) == 1:
                    await session.close_stdin()
                else:
                    await session.write_stdin(data[1:])
        elif msg.get("text"):
            ctl = json.loads(msg["text"])
            if "signal" in ctl:
                await session.signal(int(ctl["signal"]))
            if "resize" in ctl:
                rows, cols = ctl["resize"]
                await session.resize(int(rows), int(cols))


async def _relay_exec(ws: WebSocket, session: ExecSession) -> None:
    async def pump_out() -> None:
        while (item := await session.read()) is not None:
            channel, data = item
            await ws.send_bytes(bytes([channel]) + data)

    inbound = asyncio.create_task(_pump_in(ws, session))
    try:
        await pump_out()
        result = await session.wait()
    except VzError as exc:
        inbound.cancel()
        await ws_error(ws, exc)
        return
    finally:
        inbound.cancel()
    with contextlib.suppress(Exception):
        await ws.send_text(result.model_dump_json())
        await ws.close()
