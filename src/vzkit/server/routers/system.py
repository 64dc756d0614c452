"""The daemon itself: version and who is asking, its TLS listener and trust store, the
host, usage numbers, and shutdown."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from vzkit import __version__
from vzkit.api.instances import InstanceStats
from vzkit.api.remote import (
    ServerConfig,
    TrustCreate,
    TrustCreated,
    TrustEntry,
    TrustJoin,
    TrustJoined,
    TrustType,
)
from vzkit.errors import StateError
from vzkit.host.probe import probe_host
from vzkit.server.metrics import RequestMetrics, render
from vzkit.server.remote import caller_of
from vzkit.server.routers.common import API, ERRORS, Remote, Stats, Svc

router = APIRouter()
# Registered last, as it always was (the schema lists operations in registration order).
shutdown_router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request, collector: Stats) -> Response:
    requests: RequestMetrics = request.app.state.requests
    text = render(await collector.collect(), requests, __version__)
    return Response(text, media_type="text/plain; version=0.0.4")


@router.get(f"{API}/stats", responses=ERRORS)
async def stats(collector: Stats) -> list[InstanceStats]:
    return await collector.collect()


@router.get(API)
async def server_info(request: Request, remote: Remote) -> dict[str, Any]:
    caller = caller_of(request.scope)
    info: dict[str, Any] = {"api_version": "1.0", "server_version": __version__}
    if request.url.scheme == "https":
        # Public: a client checks it against the fingerprint it was given out of band
        # (the join token) before it sends a secret.
        info["ca_certificate"] = remote.ca_pem()
    if caller is None or caller.kind == "anonymous":
        return {**info, "auth": "untrusted"}
    return {**info, "auth": "trusted", "caller": str(caller), "pid": os.getpid()}


@router.get(f"{API}/server", responses=ERRORS)
async def server_config(remote: Remote) -> dict[str, Any]:
    return remote.info()


@router.patch(f"{API}/server", responses=ERRORS)
async def configure_server(cfg: ServerConfig, remote: Remote) -> dict[str, Any]:
    return await remote.configure(cfg)


@router.get(f"{API}/trust", responses=ERRORS)
async def list_trust(remote: Remote) -> list[TrustEntry]:
    return remote.trust.entries()


@router.post(f"{API}/trust", status_code=201, responses=ERRORS)
async def add_trust(req: TrustCreate, remote: Remote) -> TrustCreated:
    addresses = remote.addresses()  # a netlink dump when listening on every address
    if req.type is TrustType.CERTIFICATE and not addresses:
        raise StateError(
            "vzd does not listen on the network, so a join token could not reach it",
            hint="turn the TLS API on first: vz daemon listen :8443",
        )
    # In the loop, not a thread: it writes the database (signing takes under 1 ms).
    return remote.trust.add(req, addresses)


@router.delete(f"{API}/trust/{{name}}", status_code=204, responses=ERRORS)
async def remove_trust(name: str, remote: Remote) -> Response:
    remote.trust.remove(name)
    return Response(status_code=204)


@router.post(f"{API}/trust/join", responses=ERRORS)
async def join(req: TrustJoin, remote: Remote) -> TrustJoined:
    return remote.trust.join(req)


@router.get(f"{API}/host")
async def host_info(svc: Svc, refresh: bool = False) -> dict[str, Any]:
    # Served from the per-boot cache (memory figures are read live); refresh re-probes.
    info = await asyncio.to_thread(probe_host, svc.settings, refresh=refresh)
    return info.model_dump(mode="json")


@shutdown_router.post(f"{API}/daemon/shutdown", status_code=202)
async def shutdown_daemon(request: Request) -> dict[str, str]:
    asyncio.get_running_loop().call_later(0.05, request.app.state.shutdown)
    return {"status": "shutting down"}
