"""The error hierarchy: every failure a user can cause or meet is one of these.

Each error carries a user-facing message and a hint saying how to fix it. The API maps
the class to an HTTP status at its edge (``http_status``); the CLI prints message and hint.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VzError(Exception):
    """Root of all vzkit errors."""

    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.hint:
            body["hint"] = self.hint
        if self.details:
            body["details"] = self.details
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any], status: int) -> VzError:
        """Rebuild the matching error on the client side from an API error body."""
        code = body.get("code", "")
        klass: type[VzError] = _BY_CODE.get(code, VzError)
        err = klass(str(body.get("error", f"HTTP {status}")), body.get("hint"))
        err.details = body.get("details") or {}
        return err


class NotFound(VzError):
    http_status = 404
    code = "not_found"


class Conflict(VzError):
    """The name is taken, or the resource is in use."""

    http_status = 409
    code = "conflict"


class StateError(VzError):
    """The operation does not fit the instance's current state."""

    http_status = 409
    code = "invalid_state"


class InvalidConfig(VzError):
    http_status = 400
    code = "invalid_config"


class ResourceExhausted(VzError):
    """The host has not enough CPU, memory or disk left for the request."""

    http_status = 507
    code = "resource_exhausted"


class HostUnsupported(VzError):
    """The host lacks something vzkit needs (a binary, a kernel feature, a device)."""

    http_status = 501
    code = "host_unsupported"


class EngineError(VzError):
    """QEMU or the guest failed while doing what was asked."""

    http_status = 500
    code = "engine_error"


class ImageError(VzError):
    """An image is missing its files, or they are corrupt."""

    http_status = 422
    code = "image_error"


class AgentError(EngineError):
    """The guest agent did not answer, or answered with an error."""

    code = "agent_error"


class Unauthorized(VzError):
    """A remote caller sent no credentials, or ones vzd does not know."""

    http_status = 401
    code = "unauthorized"


class Forbidden(VzError):
    """A remote caller is known but not allowed (a revoked certificate, an expired token)."""

    http_status = 403
    code = "forbidden"


class TooLarge(VzError):
    """A request body is larger than its route accepts."""

    http_status = 413
    code = "too_large"


class RequestTimeout(VzError):
    """A client sent its request (headers or body) too slowly."""

    http_status = 408
    code = "timeout"


class RateLimited(VzError):
    """An unauthenticated caller called too often; ``retry_after`` says when to try again."""

    http_status = 429
    code = "rate_limited"

    def __init__(self, message: str, hint: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


class DaemonUnavailable(VzError):
    """The CLI or SDK could not reach vzd."""

    http_status = 503
    code = "daemon_unavailable"


_BY_CODE: dict[str, type[VzError]] = {
    k.code: k
    for k in (
        VzError,
        NotFound,
        Conflict,
        StateError,
        InvalidConfig,
        ResourceExhausted,
        HostUnsupported,
        EngineError,
        ImageError,
        AgentError,
        Unauthorized,
        Forbidden,
        TooLarge,
        RequestTimeout,
        RateLimited,
        DaemonUnavailable,
    )
}
