"""The REST API: the app, its error mapping and middleware, and one router per resource
(vzkit.server.routers). Every route calls one method of its resource's service.

Errors are mapped to HTTP here and only here: a ``VzError`` becomes its class's status
with an ``ErrorBody``; request validation failures become 422 with the same body shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vzkit import __version__
from vzkit.errors import InvalidConfig, VzError
from vzkit.server.core import Services
from vzkit.server.limits import RequestLimits
from vzkit.server.metrics import AuditLog, RequestMetrics
from vzkit.server.remote import MUTATING, AuthMiddleware, RemoteAccess, caller_of
from vzkit.server.routers import (
    images,
    instances,
    networks,
    operations,
    snapshots,
    system,
    transfers,
    volumes,
)
from vzkit.server.routers.common import validation_message

log = logging.getLogger(__name__)

# In the order the routes were always registered: the schema lists operations in this
# order, and clients that walk it (the API fuzz test) see the same sequence.
ROUTERS = (
    system.router,
    instances.router,
    networks.router,
    operations.events_router,
    volumes.router,
    snapshots.router,
    operations.router,
    networks.instance_router,
    images.router,
    transfers.router,
    images.delete_router,
    system.shutdown_router,
)


def create_app(services: Services, shutdown: Callable[[], None], remote: RemoteAccess) -> FastAPI:
    app = FastAPI(
        title="vzd", version=__version__, openapi_url="/openapi.json", docs_url=None, redoc_url=None
    )
    app.state.services = services
    app.state.remote = remote
    app.state.shutdown = shutdown
    app.state.requests = requests = RequestMetrics()
    audit = AuditLog(services.settings.state_dir / "audit.log")
    _handle_errors(app)
    for router in ROUTERS:
        app.include_router(router)
    # Innermost first: request limits inside the metrics, which count their answers.
    app.add_middleware(RequestLimits, settings=services.settings, caller=caller_of)
    app.add_middleware(_Measure, requests=requests, audit=audit)
    app.add_middleware(AuthMiddleware, remote=remote, audit=audit)  # outermost: runs first
    return app


class _Measure:
    """Counts each request by route template and status, times it to its response's start,
    and writes mutating ones to the audit log. Pure ASGI: on the list path a wrapping HTTP
    middleware costs more than the route itself."""

    def __init__(self, app: ASGIApp, requests: RequestMetrics, audit: AuditLog) -> None:
        self.app = app
        self.requests = requests
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._observe(scope, message["status"], time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, timed)

    def _observe(self, scope: Scope, status: int, elapsed: float) -> None:
        method = scope["method"]
        route = getattr(scope.get("route"), "path", "unmatched")
        self.requests.observe(method, route, status, elapsed)
        if method in MUTATING:
            caller = str(caller_of(scope) or "unknown")
            self.audit.record(method, scope["path"], status, elapsed, caller)


def _handle_errors(app: FastAPI) -> None:
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
            validation_message(exc), hint="see the API reference in docs/api.md"
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
