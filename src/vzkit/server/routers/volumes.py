"""Storage pools, volumes, and an instance's volumes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from vzkit.api.instances import Instance
from vzkit.api.storage import (
    PoolConfig,
    PoolInfo,
    VolumeAttachment,
    VolumeConfig,
    VolumeInfo,
    VolumeUpdate,
)
from vzkit.server.routers.common import API, ERRORS, Volumes

router = APIRouter()


@router.get(f"{API}/storage", responses=ERRORS)
async def list_pools(volumes: Volumes) -> list[PoolInfo]:
    return volumes.pools()


@router.post(f"{API}/storage", status_code=201, responses=ERRORS)
async def create_pool(config: PoolConfig, volumes: Volumes) -> PoolInfo:
    return await volumes.create_pool(config)


@router.get(f"{API}/storage/{{pool}}", responses=ERRORS)
async def get_pool(pool: str, volumes: Volumes) -> PoolInfo:
    return volumes.pool(pool)


@router.delete(f"{API}/storage/{{pool}}", status_code=204, responses=ERRORS)
async def delete_pool(pool: str, volumes: Volumes) -> Response:
    await volumes.delete_pool(pool)
    return Response(status_code=204)


@router.get(f"{API}/volumes", responses=ERRORS)
async def list_volumes(volumes: Volumes, pool: str | None = None) -> list[VolumeInfo]:
    return volumes.all(pool)


@router.post(f"{API}/volumes", status_code=201, responses=ERRORS)
async def create_volume(config: VolumeConfig, volumes: Volumes) -> VolumeInfo:
    return await volumes.create(config)


@router.get(f"{API}/storage/{{pool}}/volumes/{{name}}", responses=ERRORS)
async def get_volume(pool: str, name: str, volumes: Volumes) -> VolumeInfo:
    return volumes.get(pool, name)


@router.patch(f"{API}/storage/{{pool}}/volumes/{{name}}", responses=ERRORS)
async def resize_volume(pool: str, name: str, change: VolumeUpdate, volumes: Volumes) -> VolumeInfo:
    return await volumes.resize(pool, name, change.size)


@router.delete(f"{API}/storage/{{pool}}/volumes/{{name}}", status_code=204, responses=ERRORS)
async def delete_volume(pool: str, name: str, volumes: Volumes) -> Response:
    await volumes.delete(pool, name)
    return Response(status_code=204)


@router.post(f"{API}/instances/{{name}}/volumes", responses=ERRORS)
async def attach_volume(name: str, att: VolumeAttachment, volumes: Volumes) -> Instance:
    return await volumes.attach(name, att)


@router.delete(f"{API}/instances/{{name}}/volumes/{{pool}}/{{volume}}", responses=ERRORS)
async def detach_volume(name: str, pool: str, volume: str, volumes: Volumes) -> Instance:
    return await volumes.detach(name, pool, volume)
