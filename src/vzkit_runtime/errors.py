"""The runtime's errors: a message and a hint, printed by the CLI as ``error:``/``hint:``
lines (and logged to ``--log``, as text or JSON lines, for the engine that called it).

The classes mirror what went wrong, not an HTTP status: the caller is a process reading
an exit status and stderr. Nothing here imports beyond the language itself.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is slow to import; see spec.py
    from typing import Any


class VzRuntimeError(Exception):
    """Root of the runtime's errors: ``message`` for the user, ``hint`` for the fix, and
    ``details`` (a syscall's errno, a path) for whoever reads them as data."""

    code = "internal"

    def __init__(self, message: str, hint: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """As JSON: how a forked helper reports it to the runtime (see nsjoin.py)."""
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.hint:
            body["hint"] = self.hint
        if self.details:
            body["details"] = self.details
        return body

    @staticmethod
    def from_dict(body: dict[str, Any]) -> VzRuntimeError:
        """The error :meth:`to_dict` described, as the class its code names."""
        klass = BY_CODE.get(str(body.get("code")), EngineError)
        hint = body.get("hint")
        err = klass(str(body.get("error")), hint=hint if isinstance(hint, str) else None)
        details = body.get("details")
        err.details = details if isinstance(details, dict) else {}
        return err


class NotFound(VzRuntimeError):
    """The container, bundle or path does not exist."""

    code = "not_found"


class Conflict(VzRuntimeError):
    """The id is taken, or the cgroup or mount point is in use."""

    code = "conflict"


class StateError(VzRuntimeError):
    """The command does not fit the container's status (start a running container...)."""

    code = "invalid_state"


class InvalidConfig(VzRuntimeError):
    """config.json, a process file or an argument is wrong."""

    code = "invalid_config"


class HostUnsupported(VzRuntimeError):
    """The host lacks a kernel feature or cgroup controller the config asks for."""

    code = "host_unsupported"


class EngineError(VzRuntimeError):
    """A step of container set-up or control failed on the host."""

    code = "engine_error"


BY_CODE: dict[str, type[VzRuntimeError]] = {
    k.code: k
    for k in (VzRuntimeError, NotFound, Conflict, StateError, InvalidConfig, HostUnsupported,
              EngineError)
}  # fmt: skip
