"""An instance's snapshots, and copies of it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from vzkit.api.instances import Instance
from vzkit.api.snapshots import CopyRequest, SnapshotCreate, SnapshotInfo
from vzkit.server.routers.common import API, BG, ERRORS, Bg, Snapshots

router = APIRouter()


@router.get(f"{API}/instances/{{name}}/snapshots", responses=ERRORS)
async def list_snapshots(name: str, snapshots: Snapshots) -> list[SnapshotInfo]:
    return snapshots.list(name)


@router.post(
    f"{API}/instances/{{name}}/snapshots",
    status_code=201,
    response_model=SnapshotInfo,
    responses=BG,
)
async def create_snapshot(
    name: str, req: SnapshotCreate, snapshots: Snapshots, bg: Bg, background: bool = False
) -> Any:
    work = snapshots.create(name, req.name, stateful=req.stateful)
    return await bg.run(background, "snapshot-create", name, work)


@router.get(f"{API}/instances/{{name}}/snapshots/{{snapshot}}", responses=ERRORS)
async def get_snapshot(name: str, snapshot: str, snapshots: Snapshots) -> SnapshotInfo:
    return snapshots.get(name, snapshot)


@router.post(
    f"{API}/instances/{{name}}/snapshots/{{snapshot}}/restore",
    response_model=Instance,
    responses=BG,
)
async def restore_snapshot(
    name: str, snapshot: str, snapshots: Snapshots, bg: Bg, background: bool = False
) -> Any:
    work = snapshots.restore(name, snapshot)
    return await bg.run(background, "snapshot-restore", name, work)


@router.delete(
    f"{API}/instances/{{name}}/snapshots/{{snapshot}}", status_code=204, responses=ERRORS
)
async def delete_snapshot(name: str, snapshot: str, snapshots: Snapshots) -> Response:
    await snapshots.delete(name, snapshot)
    return Response(status_code=204)


@router.post(
    f"{API}/instances/{{name}}/copy", status_code=201, response_model=Instance, responses=BG
)
async def copy_instance(
    name: str, req: CopyRequest, snapshots: Snapshots, bg: Bg, background: bool = False
) -> Any:
    return await bg.run(background, "instance-copy", name, snapshots.copy(name, req.name))
