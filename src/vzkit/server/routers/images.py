"""Images: listed, built (a progress stream) and deleted."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from vzkit.api.instances import ImageInfo
from vzkit.server.routers.common import API, ERRORS, Images, image_stream

router = APIRouter()
# Registered after the transfers' routes, as it always was.
delete_router = APIRouter()


@router.get(f"{API}/images", responses=ERRORS)
async def list_images(images: Images) -> list[ImageInfo]:
    return images.list()


@router.get(f"{API}/images/{{name}}", responses=ERRORS)
async def get_image(name: str, images: Images) -> ImageInfo:
    return images.get(name)


@router.post(f"{API}/images/{{name}}/build", responses=ERRORS)
async def build_image(name: str, images: Images, force: bool = False) -> StreamingResponse:
    if not images.known(name):
        await images.ensure(name)  # raises NotFound with the list of names
    return StreamingResponse(
        image_stream(lambda progress: images.build(name, progress, force)),
        media_type="application/x-ndjson",
    )


@delete_router.delete(f"{API}/images/{{name}}", status_code=204, responses=ERRORS)
async def delete_image(name: str, images: Images) -> Response:
    await images.delete(name)
    return Response(status_code=204)
