"""What the routers share: the services as dependencies, the error responses documented
on every route, background operations (``?background=true``) and streamed image builds."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any, cast

from fastapi import Depends, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import HTTPConnection

from vzkit.api.instances import ErrorBody, ImageInfo
from vzkit.api.operations import Operation
from vzkit.errors import VzError
from vzkit.server.core import Services
from vzkit.server.events import EventBus
from vzkit.server.metrics import StatsCollector
from vzkit.server.operations import Operations
from vzkit.server.remote import RemoteAccess
from vzkit.server.services.images import ImageService
from vzkit.server.services.instances import InstanceService
from vzkit.server.services.networks import NetworkService
from vzkit.server.services.snapshots import SnapshotService
from vzkit.server.services.transfers import TransferService
from vzkit.server.services.volumes import VolumeService

API = "/1.0"
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 422, 500, 501, 507)
}
# Routes that take ?background=true answer 202 with an Operation.
BG: dict[int | str, dict[str, Any]] = {**ERRORS, 202: {"model": Operation}}


def services(conn: HTTPConnection) -> Services:
    return cast(Services, conn.app.state.services)


# The providers are coroutines: FastAPI runs a plain function dependency in a worker
# thread, a thread hop on every request that cost more than serving a cached list.
async def _services(conn: HTTPConnection) -> Services:
    return services(conn)


async def _instances(conn: HTTPConnection) -> InstanceService:
    return services(conn).instances


async def _snapshots(conn: HTTPConnection) -> SnapshotService:
    return services(conn).snapshots


async def _transfers(conn: HTTPConnection) -> TransferService:
    return services(conn).transfers


async def _volumes(conn: HTTPConnection) -> VolumeService:
    return services(conn).volumes


async def _networks(conn: HTTPConnection) -> NetworkService:
    return services(conn).networks


async def _images(conn: HTTPConnection) -> ImageService:
    return services(conn).images


async def _operations(conn: HTTPConnection) -> Operations:
    return services(conn).operations


async def _events(conn: HTTPConnection) -> EventBus:
    return services(conn).events


async def _stats(conn: HTTPConnection) -> StatsCollector:
    return services(conn).stats


async def _remote(conn: HTTPConnection) -> RemoteAccess:
    return cast(RemoteAccess, conn.app.state.remote)


# Route parameters: each router asks for its own service.
Svc = Annotated[Services, Depends(_services)]
Instances = Annotated[InstanceService, Depends(_instances)]
Snapshots = Annotated[SnapshotService, Depends(_snapshots)]
Transfers = Annotated[TransferService, Depends(_transfers)]
Volumes = Annotated[VolumeService, Depends(_volumes)]
Networks = Annotated[NetworkService, Depends(_networks)]
Images = Annotated[ImageService, Depends(_images)]
Ops = Annotated[Operations, Depends(_operations)]
Events = Annotated[EventBus, Depends(_events)]
Stats = Annotated[StatsCollector, Depends(_stats)]
Remote = Annotated[RemoteAccess, Depends(_remote)]


class Background:
    """``?background=true``: the work runs as an operation, answered at once with 202."""

    def __init__(self, svc: Services) -> None:
        self.operations = svc.operations
        self.guard = svc.guard

    async def run(
        self, background: bool, kind: str, resource: str | None, work: Coroutine[Any, Any, Any]
    ) -> Any:
        """The work's result now, or (``?background=true``) 202 and its operation."""
        if not background:
            return await work
        if resource is not None and kind != "instance-create":
            try:
                self.guard.get(resource)  # an unknown instance is a 404 now, not a failed op
            except VzError:
                work.close()
                raise
        op = self.operations.submit(kind, resource, work)
        return JSONResponse(
            op.model_dump(mode="json"),
            status_code=202,
            headers={"Location": f"{API}/operations/{op.id}"},
        )


async def _background(conn: HTTPConnection) -> Background:
    return Background(services(conn))


Bg = Annotated[Background, Depends(_background)]


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """A request validation failure (FastAPI's or pydantic's) as one sentence."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            why = err.get("ctx", {}).get("error", "")
            parts.append(f"the body is not valid JSON ({why} at character {err['loc'][-1]})")
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


async def image_stream(
    job: Callable[[Callable[[str, float | None], None]], Awaitable[ImageInfo]],
) -> AsyncIterator[bytes]:
    """NDJSON: progress lines while ``job`` makes an image, then the image or an error."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def progress(step: str, fraction: float | None) -> None:
        loop.call_soon_threadsafe(
            queue.put_nowait, {"progress": {"step": step, "fraction": fraction}}
        )

    async def work() -> None:
        try:
            info = await job(progress)
            queue.put_nowait({"image": info.model_dump(mode="json")})
        except VzError as exc:
            queue.put_nowait({"error": exc.to_dict()})
        except Exception as exc:  # the stream has started: report, don't 500
            queue.put_nowait({"error": {"error": str(exc), "code": "internal"}})

    task = asyncio.create_task(work())
    try:
        while True:
            item = await queue.get()
            yield (json.dumps(item) + "\n").encode()
            if "progress" not in item:
                break
    finally:
        await task


async def ws_error(ws: WebSocket, exc: VzError) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps(exc.to_dict()))
        await ws.close()
