"""What the SDK's modules share: the API prefix, error bodies, and answers into models.

Pydantic is imported only when an answer is parsed, never at load time (the CLI's start-up
budget): the model classes are passed in by callers that import them where they need them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

from vzkit.errors import InvalidConfig, NotFound, VzError

if TYPE_CHECKING:
    from pydantic import BaseModel, TypeAdapter, ValidationError

API = "/1.0"

M = TypeVar("M", bound="BaseModel")


def parse(model: type[M], data: Any) -> M:
    """Validate an answer into ``model``; a mismatch is a version skew, said so."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _skew(f"a {model.__name__}", exc) from exc


def parse_list(model: type[M], raw: bytes) -> list[M]:
    """A list answer, validated from its undecoded bytes in one pass (half the time of
    decoding first: it matters for long lists, such as 200 instances polled often)."""
    from pydantic import ValidationError

    try:
        return _list_adapter(model).validate_json(raw)
    except ValidationError as exc:
        raise _skew(f"a list of {model.__name__}", exc) from exc


@functools.cache
def _list_adapter(model: type[M]) -> TypeAdapter[list[M]]:
    from pydantic import TypeAdapter

    return TypeAdapter(list[model])  # type: ignore[valid-type]


def _skew(what: str, exc: ValidationError) -> VzError:
    return VzError(
        f"vzd sent {what} this client does not understand: {exc.errors()[0]['msg']}",
        hint="vz and vzd may be different versions: compare with: vz daemon status",
    )


def error_from_response(status: int, data: bytes) -> VzError:
    """The error an HTTP error answer stands for: its ErrorBody's class, or a generic one."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body and "code" in body:
        return VzError.from_dict(body, status)
    # Not an ErrorBody: a framework-level answer (unknown route, schema rejection).
    detail: Any = body.get("detail") if isinstance(body, dict) else None
    text = detail if detail is not None else data.decode("utf-8", "replace").strip()
    if status in (400, 422):
        return InvalidConfig(f"vzd rejected the request: {text}")
    if status == 404:
        return NotFound(f"not found: {text}", hint="is vz newer than vzd? see: vz daemon status")
    return VzError(f"vzd answered HTTP {status}: {text}")


def q(name: str) -> str:
    """A name as one path segment."""
    return quote(name, safe="")


def fmt_query(query: Mapping[str, Any] | None) -> str:
    if not query:
        return ""
    items = {
        k: ("true" if v else "false") if isinstance(v, bool) else v
        for k, v in query.items()
        if v is not None
    }
    return "?" + urlencode(items) if items else ""


def json_default(obj: Any) -> Any:
    # Models nested in a plain mapping (e.g. run(limits=Limits(...))).
    dump = getattr(obj, "model_dump", None)
    if dump is None:
        raise TypeError(f"cannot send {type(obj).__name__} as JSON")
    return dump(mode="json")
