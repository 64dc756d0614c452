"""Export and import of instances, and an instance published as an image."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from vzkit.api.instances import Instance
from vzkit.server.routers.common import API, ERRORS, Transfers, image_stream

router = APIRouter()


@router.post(f"{API}/instances/{{name}}/publish", responses=ERRORS)
async def publish_instance(
    name: str, transfers: Transfers, image: str = Query(...)
) -> StreamingResponse:
    transfers.check_publish(name, image)  # a 4xx before the stream starts
    return StreamingResponse(
        image_stream(lambda progress: transfers.publish(name, image, progress)),
        media_type="application/x-ndjson",
    )


@router.get(f"{API}/instances/{{name}}/export", responses=ERRORS)
async def export_instance(name: str, transfers: Transfers) -> StreamingResponse:
    size, chunks = await transfers.export(name)
    return StreamingResponse(
        chunks, media_type="application/x-tar", headers={"X-Vz-Export-Size": str(size)}
    )


@router.post(f"{API}/import", status_code=201, responses=ERRORS)
async def import_instance(
    request: Request, transfers: Transfers, name: str | None = None
) -> Instance:
    return await transfers.import_(request.stream(), name)
