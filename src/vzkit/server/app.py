"""The REST API: routing and (de)serialisation only; every route calls one action.

Errors are mapped to HTTP here and only here: a ``VzError`` becomes its class's status
with an ``ErrorBody``; request validation failures become 422 with the same body shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vzkit import __version__
from vzkit.api.instances import (
    ErrorBody,
    ExecRequest,
    ImageInfo,
    Instance,
    InstanceCreate,
    InstanceStats,
    InstanceUpdate,
    StateChange,
)
from vzkit.api.networks import (
    FirewallRule,
    FirewallUpdate,
    NetworkConfig,
    NetworkUpdate,
    NicConfig,
    PortForward,
    Proto,
)
from vzkit.api.operations import Operation
from vzkit.api.remote import (
    ServerConfig,
    TrustCreate,
    TrustCreated,
    TrustEntry,
    TrustJoin,
    TrustJoined,
    TrustType,
)
from vzkit.api.snapshots import CopyRequest, SnapshotCreate, SnapshotInfo
from vzkit.api.storage import (
    PoolConfig,
    PoolInfo,
    VolumeAttachment,
    VolumeConfig,
    VolumeInfo,
    VolumeUpdate,
)
from vzkit.engines.base import ExecSession
from vzkit.errors import InvalidConfig, StateError, VzError
from vzkit.host.probe import probe_host
from vzkit.server.core import Services
from vzkit.server.limits import RequestLimits
from vzkit.server.metrics import AuditLog, RequestMetrics, render
from vzkit.server.remote import MUTATING, AuthMiddleware, RemoteAccess, caller_of

API = "/1.0"
log = logging.getLogger(__name__)
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 422, 500, 501, 507)
}
# Routes that take ?background=true answer 202 with an Operation.
_BG: dict[int | str, dict[str, Any]] = {**_ERRORS, 202: {"model": Operation}}


def _validation_message(exc: RequestValidationError | ValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            why = err.get("ctx", {}).get("error", "")
            parts.append(f"the body is not valid JSON ({why} at character {err['loc'][-1]})")
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def create_app(services: Services, shutdown: Callable[[], None], remote: RemoteAccess) -> FastAPI:
    app = FastAPI(
        title="vzd", version=__version__, openapi_url="/openapi.json", docs_url=None, redoc_url=None
    )
    # First added, so innermost of the middleware: inside _measure, which counts its answers.
    app.add_middleware(RequestLimits, settings=services.settings, caller=caller_of)

    requests = RequestMetrics()
    audit = AuditLog(services.settings.state_dir / "audit.log")

    async def _run(
        background: bool, kind: str, resource: str | None, work: Coroutine[Any, Any, Any]
    ) -> Any:
        """The work's result now, or (``?background=true``) 202 and its operation."""
        if not background:
            return await work
        if resource is not None and kind != "instance-create":
            try:
                services.instances.get(
                    resource
                )  # an unknown instance is a 404 now, not a failed op
            except VzError:
                work.close()
                raise
        op = services.operations.submit(kind, resource, work)
        return JSONResponse(
            op.model_dump(mode="json"),
            status_code=202,
            headers={"Location": f"{API}/operations/{op.id}"},
        )

    @app.middleware("http")
    async def _measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        elapsed = time.perf_counter() - start
        requests.observe(request.method, route, response.status_code, elapsed)
        if request.method in MUTATING:
            caller = str(caller_of(request.scope) or "unknown")
            audit.record(request.method, request.url.path, response.status_code, elapsed, caller)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        text = render(await services.stats.collect(), requests, __version__)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get(f"{API}/stats", responses=_ERRORS)
    async def stats() -> list[InstanceStats]:
        return await services.stats.collect()

    @app.exception_handler(VzError)
    async def _vz_error(request: Request, exc: VzError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a user error: still a JSON body, and the traceback goes to the log.
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        body = {
            "error": f"internal error: {type(exc).__name__}: {exc}",
            "code": "internal",
            "hint": "this is a bug in vzd; its log has the details",
        }
        return JSONResponse(body, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = InvalidConfig(
            _validation_message(exc), hint="see the API reference in docs/api.md"
        ).to_dict()
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (no such route, a method the route lacks, a body that is
        # not UTF-8): an ErrorBody like every other error, pointing at the reference.
        code = "not_found" if exc.status_code == 404 else "http_error"
        hint = "see the API reference in docs/api.md"
        body = {"error": str(exc.detail), "code": code, "hint": hint}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get(API)
    async def server_info(request: Request) -> dict[str, Any]:
        import os

        caller = caller_of(request.scope)
        info: dict[str, Any] = {"api_version": "1.0", "server_version": __version__}
        if request.url.scheme == "https":
            # Public: a client checks it against the fingerprint it was given out of band
            # (the join token) before it sends a secret.
            info["ca_certificate"] = remote.ca_pem()
        if caller is None or caller.kind == "anonymous":
            return {**info, "auth": "untrusted"}
        return {**info, "auth": "trusted", "caller": str(caller), "pid": os.getpid()}

    @app.get(f"{API}/server", responses=_ERRORS)
    async def server_config() -> dict[str, Any]:
        return remote.info()

    @app.patch(f"{API}/server", responses=_ERRORS)
    async def configure_server(cfg: ServerConfig) -> dict[str, Any]:
        return await remote.configure(cfg)

    @app.get(f"{API}/trust", responses=_ERRORS)
    async def list_trust() -> list[TrustEntry]:
        return remote.trust.entries()

    @app.post(f"{API}/trust", status_code=201, responses=_ERRORS)
    async def add_trust(req: TrustCreate) -> TrustCreated:
        addresses = remote.addresses()  # a netlink dump when listening on every address
        if req.type is TrustType.CERTIFICATE and not addresses:
            raise StateError(
                "vzd does not listen on the network, so a join token could not reach it",
                hint="turn the TLS API on first: vz daemon listen :8443",
            )
        # In the loop, not a thread: it writes the database (signing takes under 1 ms).
        return remote.trust.add(req, addresses)

    @app.delete(f"{API}/trust/{{name}}", status_code=204, responses=_ERRORS)
    async def remove_trust(name: str) -> Response:
        remote.trust.remove(name)
        return Response(status_code=204)

    @app.post(f"{API}/trust/join", responses=_ERRORS)
    async def join(req: TrustJoin) -> TrustJoined:
        return remote.trust.join(req)

    @app.get(f"{API}/host")
    async def host_info(refresh: bool = False) -> dict[str, Any]:
        # Served from the per-boot cache (memory figures are read live); refresh re-probes.
        info = await asyncio.to_thread(probe_host, services.settings, refresh=refresh)
        return info.model_dump(mode="json")

    @app.get(f"{API}/instances", response_model=list[Instance], responses=_ERRORS)
    async def list_instances() -> Response:
        # Serialised once per change of any record, not per request.
        return Response(services.instances.list_json(), media_type="application/json")

    @app.post(f"{API}/instances", status_code=201, response_model=Instance, responses=_BG)
    async def create_instance(req: InstanceCreate, background: bool = False) -> Any:
        return await _run(background, "instance-create", req.name, services.instances.create(req))

    @app.get(f"{API}/instances/{{name}}", responses=_ERRORS)
    async def get_instance(name: str) -> Instance:
        return services.instances.get(name)

    @app.delete(f"{API}/instances/{{name}}", status_code=204, response_model=None, responses=_BG)
    async def delete_instance(name: str, force: bool = False, background: bool = False) -> Any:
        if background:
            return await _run(
                True, "instance-delete", name, services.instances.delete(name, force=force)
            )
        await services.instances.delete(name, force=force)
        return Response(status_code=204)

    @app.patch(f"{API}/instances/{{name}}", responses=_ERRORS)
    async def update_instance(name: str, change: InstanceUpdate) -> Instance:
        return await services.instances.update(name, change)

    @app.put(f"{API}/instances/{{name}}/state", response_model=Instance, responses=_BG)
    async def change_state(name: str, change: StateChange, background: bool = False) -> Any:
        work = services.instances.change_state(name, change)
        return await _run(background, f"instance-{change.action.value}", name, work)

    @app.get(f"{API}/instances/{{name}}/console/log", responses=_ERRORS)
    async def console_log(name: str) -> Response:
        return Response(services.instances.console_log(name), media_type="text/plain")

    @app.put(f"{API}/instances/{{name}}/files", status_code=204, responses=_ERRORS)
    async def push_file(
        name: str,
        request: Request,
        path: str = Query(...),
        mode: str = "0644",
        parents: bool = False,
    ) -> Response:
        try:
            mode_int = int(mode, 8)
        except ValueError:
            raise InvalidConfig(
                f"invalid file mode {mode!r}", hint="give an octal mode such as 0644"
            ) from None
        await services.instances.push_file(name, path, request.stream(), mode_int, parents)
        return Response(status_code=204)

    @app.get(f"{API}/instances/{{name}}/files", responses=_ERRORS)
    async def pull_file(name: str, path: str = Query(...)) -> StreamingResponse:
        mode, chunks = await services.instances.pull_file(name, path)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={"X-Vz-File-Mode": f"{mode & 0o7777:04o}"},
        )

    @app.websocket(f"{API}/instances/{{name}}/exec")
    async def exec_ws(ws: WebSocket, name: str) -> None:
        await ws.accept()
        try:
            req = ExecRequest.model_validate_json(await ws.receive_text())
            session = await services.instances.exec(name, req)
        except ValidationError as exc:
            await _ws_error(ws, InvalidConfig(_validation_message(exc)))
            return
        except VzError as exc:
            await _ws_error(ws, exc)
            return
        except WebSocketDisconnect:
            return
        await _relay_exec(ws, session)

    @app.websocket(f"{API}/instances/{{name}}/console")
    async def console_ws(ws: WebSocket, name: str, history: bool = False) -> None:
        await ws.accept()
        try:
            stream = await services.instances.open_console(name)
        except VzError as exc:
            await _ws_error(ws, exc)
            return
        if history:
            await ws.send_bytes(services.instances.console_log(name))

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

    @app.get(f"{API}/networks", responses=_ERRORS)
    async def list_networks() -> list[NetworkConfig]:
        return services.networks.all()

    @app.post(f"{API}/networks", status_code=201, responses=_ERRORS)
    async def create_network(config: NetworkConfig) -> NetworkConfig:
        return await services.networks.create(config)

    @app.get(f"{API}/networks/{{name}}", responses=_ERRORS)
    async def get_network(name: str) -> NetworkConfig:
        return services.networks.get(name)

    @app.patch(f"{API}/networks/{{name}}", responses=_ERRORS)
    async def update_network(name: str, change: NetworkUpdate) -> NetworkConfig:
        return await services.networks.update(name, change)

    @app.delete(f"{API}/networks/{{name}}", status_code=204, responses=_ERRORS)
    async def delete_network(name: str) -> Response:
        await services.networks.delete(name)
        return Response(status_code=204)

    @app.websocket(f"{API}/events")
    async def events_ws(ws: WebSocket, type: str | None = None) -> None:
        """Lifecycle events as JSON text messages, from now on; ``?type=a,b`` filters."""
        await ws.accept()
        types = {t for t in (type or "").split(",") if t} or None
        stream = services.events.subscribe(types)

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

    # -- storage pools and volumes -------------------------------------------------------

    @app.get(f"{API}/storage", responses=_ERRORS)
    async def list_pools() -> list[PoolInfo]:
        return services.volumes.pools()

    @app.post(f"{API}/storage", status_code=201, responses=_ERRORS)
    async def create_pool(config: PoolConfig) -> PoolInfo:
        return await services.volumes.create_pool(config)

    @app.get(f"{API}/storage/{{pool}}", responses=_ERRORS)
    async def get_pool(pool: str) -> PoolInfo:
        return services.volumes.pool(pool)

    @app.delete(f"{API}/storage/{{pool}}", status_code=204, responses=_ERRORS)
    async def delete_pool(pool: str) -> Response:
        await services.volumes.delete_pool(pool)
        return Response(status_code=204)

    @app.get(f"{API}/volumes", responses=_ERRORS)
    async def list_volumes(pool: str | None = None) -> list[VolumeInfo]:
        return services.volumes.all(pool)

    @app.post(f"{API}/volumes", status_code=201, responses=_ERRORS)
    async def create_volume(config: VolumeConfig) -> VolumeInfo:
        return await services.volumes.create(config)

    @app.get(f"{API}/storage/{{pool}}/volumes/{{name}}", responses=_ERRORS)
    async def get_volume(pool: str, name: str) -> VolumeInfo:
        return services.volumes.get(pool, name)

    @app.patch(f"{API}/storage/{{pool}}/volumes/{{name}}", responses=_ERRORS)
    async def resize_volume(pool: str, name: str, change: VolumeUpdate) -> VolumeInfo:
        return await services.volumes.resize(pool, name, change.size)

    @app.delete(f"{API}/storage/{{pool}}/volumes/{{name}}", status_code=204, responses=_ERRORS)
    async def delete_volume(pool: str, name: str) -> Response:
        await services.volumes.delete(pool, name)
        return Response(status_code=204)

    @app.post(f"{API}/instances/{{name}}/volumes", responses=_ERRORS)
    async def attach_volume(name: str, att: VolumeAttachment) -> Instance:
        return await services.volumes.attach(name, att)

    @app.delete(f"{API}/instances/{{name}}/volumes/{{pool}}/{{volume}}", responses=_ERRORS)
    async def detach_volume(name: str, pool: str, volume: str) -> Instance:
        return await services.volumes.detach(name, pool, volume)

    # -- snapshots and copies ------------------------------------------------------------

    @app.get(f"{API}/instances/{{name}}/snapshots", responses=_ERRORS)
    async def list_snapshots(name: str) -> list[SnapshotInfo]:
        return services.snapshots.list(name)

    @app.post(
        f"{API}/instances/{{name}}/snapshots",
        status_code=201,
        response_model=SnapshotInfo,
        responses=_BG,
    )
    async def create_snapshot(name: str, req: SnapshotCreate, background: bool = False) -> Any:
        work = services.snapshots.create(name, req.name, stateful=req.stateful)
        return await _run(background, "snapshot-create", name, work)

    @app.get(f"{API}/instances/{{name}}/snapshots/{{snapshot}}", responses=_ERRORS)
    async def get_snapshot(name: str, snapshot: str) -> SnapshotInfo:
        return services.snapshots.get(name, snapshot)

    @app.post(
        f"{API}/instances/{{name}}/snapshots/{{snapshot}}/restore",
        response_model=Instance,
        responses=_BG,
    )
    async def restore_snapshot(name: str, snapshot: str, background: bool = False) -> Any:
        work = services.snapshots.restore(name, snapshot)
        return await _run(background, "snapshot-restore", name, work)

    @app.delete(
        f"{API}/instances/{{name}}/snapshots/{{snapshot}}", status_code=204, responses=_ERRORS
    )
    async def delete_snapshot(name: str, snapshot: str) -> Response:
        await services.snapshots.delete(name, snapshot)
        return Response(status_code=204)

    @app.post(
        f"{API}/instances/{{name}}/copy", status_code=201, response_model=Instance, responses=_BG
    )
    async def copy_instance(name: str, req: CopyRequest, background: bool = False) -> Any:
        return await _run(
            background, "instance-copy", name, services.snapshots.copy(name, req.name)
        )

    # -- background operations -----------------------------------------------------------

    @app.get(f"{API}/operations", responses=_ERRORS)
    async def list_operations() -> list[Operation]:
        return services.operations.all()

    @app.get(f"{API}/operations/{{op_id}}", responses=_ERRORS)
    async def get_operation(op_id: str) -> Operation:
        return services.operations.get(op_id)

    @app.get(f"{API}/operations/{{op_id}}/wait", responses=_ERRORS)
    async def wait_operation(
        op_id: str, timeout: float | None = Query(None, gt=0, le=3600)
    ) -> Operation:
        return await services.operations.wait(op_id, timeout)

    @app.delete(f"{API}/operations/{{op_id}}", responses=_ERRORS)
    async def cancel_operation(op_id: str) -> Operation:
        return await services.operations.cancel(op_id)

    # -- an instance's NICs, port forwards and ingress allow-list -------------------------

    @app.post(f"{API}/instances/{{name}}/nics", responses=_ERRORS)
    async def attach_nic(name: str, nic: NicConfig) -> Instance:
        return await services.networks.attach_nic(name, nic)

    @app.delete(f"{API}/instances/{{name}}/nics/{{network}}", responses=_ERRORS)
    async def detach_nic(name: str, network: str) -> Instance:
        return await services.networks.detach_nic(name, network)

    @app.post(f"{API}/instances/{{name}}/ports", responses=_ERRORS)
    async def add_port(name: str, forward: PortForward) -> Instance:
        return await services.networks.add_port(name, forward)

    @app.delete(f"{API}/instances/{{name}}/ports/{{host_port}}", responses=_ERRORS)
    async def remove_port(name: str, host_port: int, proto: Proto = Proto.TCP) -> Instance:
        return await services.networks.remove_port(name, host_port, proto)

    @app.put(f"{API}/instances/{{name}}/firewall", responses=_ERRORS)
    async def set_firewall(name: str, body: FirewallUpdate) -> Instance:
        return await services.networks.set_firewall(name, body.rules)

    @app.post(f"{API}/instances/{{name}}/firewall/rules", responses=_ERRORS)
    async def add_firewall_rule(name: str, rule: FirewallRule) -> Instance:
        return await services.networks.add_firewall_rule(name, rule)

    @app.delete(f"{API}/instances/{{name}}/firewall/rules/{{index}}", responses=_ERRORS)
    async def remove_firewall_rule(name: str, index: int) -> Instance:
        return await services.networks.remove_firewall_rule(name, index)

    @app.get(f"{API}/images", responses=_ERRORS)
    async def list_images() -> list[ImageInfo]:
        return services.images.list()

    @app.get(f"{API}/images/{{name}}", responses=_ERRORS)
    async def get_image(name: str) -> ImageInfo:
        return services.images.get(name)

    @app.post(f"{API}/images/{{name}}/build", responses=_ERRORS)
    async def build_image(name: str, force: bool = False) -> StreamingResponse:
        if not services.images.known(name):
            await services.images.ensure(name)  # raises NotFound with the list of names
        return StreamingResponse(
            _image_stream(lambda progress: services.images.build(name, progress, force)),
            media_type="application/x-ndjson",
        )

    @app.post(f"{API}/instances/{{name}}/publish", responses=_ERRORS)
    async def publish_instance(name: str, image: str = Query(...)) -> StreamingResponse:
        services.transfers.check_publish(name, image)  # a 4xx before the stream starts
        return StreamingResponse(
            _image_stream(lambda progress: services.transfers.publish(name, image, progress)),
            media_type="application/x-ndjson",
        )

    @app.get(f"{API}/instances/{{name}}/export", responses=_ERRORS)
    async def export_instance(name: str) -> StreamingResponse:
        size, chunks = await services.transfers.export(name)
        return StreamingResponse(
            chunks, media_type="application/x-tar", headers={"X-Vz-Export-Size": str(size)}
        )

    @app.post(f"{API}/import", status_code=201, responses=_ERRORS)
    async def import_instance(request: Request, name: str | None = None) -> Instance:
        return await services.transfers.import_(request.stream(), name)

    @app.delete(f"{API}/images/{{name}}", status_code=204, responses=_ERRORS)
    async def delete_image(name: str) -> Response:
        await services.images.delete(name)
        return Response(status_code=204)

    @app.post(f"{API}/daemon/shutdown", status_code=202)
    async def shutdown_daemon() -> dict[str, str]:
        asyncio.get_running_loop().call_later(0.05, shutdown)
        return {"status": "shutting down"}

    app.add_middleware(AuthMiddleware, remote=remote, audit=audit)  # outermost: runs first
    return app


async def _image_stream(
    job: Callable[[Callable[[str, float | None], None]], Awaitable[ImageInfo]],
) -> AsyncIterator[bytes]:
    """NDJSON: progress lines while ``job`` makes an image, then the image or an error."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def progress(step: str, fraction: float | None) -> None:
        loop.call_soon_threadsafe(
            queue.put_nowait, {"progress": {"step": step, "fraction": fraction}}
        )

    async def run() -> None:
        try:
            info = await job(progress)
            queue.put_nowait({"image": info.model_dump(mode="json")})
        except VzError as exc:
            queue.put_nowait({"error": exc.to_dict()})
        except Exception as exc:  # the stream has started: report, don't 500
            queue.put_nowait({"error": {"error": str(exc), "code": "internal"}})

    task = asyncio.create_task(run())
    try:
        while True:
            item = await queue.get()
            yield (json.dumps(item) + "\n").encode()
            if "progress" not in item:
                break
    finally:
        await task


async def _ws_error(ws: WebSocket, exc: VzError) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps(exc.to_dict()))
        await ws.close()


async def _relay_exec(ws: WebSocket, session: ExecSession) -> None:
    async def pump_out() -> None:
        while (item := await session.read()) is not None:
            channel, data = item
            await ws.send_bytes(bytes([channel]) + data)

    async def pump_in() -> None:
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

    inbound = asyncio.create_task(pump_in())
    try:
        await pump_out()
        result = await session.wait()
    except VzError as exc:
        inbound.cancel()
        await _ws_error(ws, exc)
        return
    finally:
        inbound.cancel()
    with contextlib.suppress(Exception):
        await ws.send_text(result.model_dump_json())
        await ws.close()
