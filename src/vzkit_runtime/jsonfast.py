"""JSON for vz-runtime's hot path, straight from the ``_json`` C accelerator.

``import json`` costs ~10 ms when nothing has loaded ``re`` yet (json.decoder and
json.scanner import it), as much as Python's own start-up: a third of runc's whole
``run``. The C scanner and encoder that ``json`` wraps need no ``re``; this module calls
them directly. Output matches ``json.dumps`` (default separators, ``ensure_ascii``), and
``indent`` output matches ``json.dumps(indent=N)``. Decoding errors raise ValueError
(``json.JSONDecodeError``: on the error path only, ``json`` is imported to report it).
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Context:
    """What ``_json.make_scanner`` reads from json.JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]
_WS = " \t\n\r"


def loads(data: str | bytes) -> Any:
    """json.loads for str or UTF-8 bytes."""
    text = data.decode() if isinstance(data, bytes | bytearray) else data
    n = len(text)
    i = 0
    while i < n and text[i] in _WS:
        i += 1
    try:
        obj, end = _scan(text, i)
    except Exception:
        # The C scanner reports errors with json.decoder.JSONDecodeError, which it
        # finds only if json is loaded (else SystemError), or with a bare StopIteration:
        # let json say what is wrong.
        import json

        return json.loads(text)
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise ValueError(f"Extra data: char {end}")
    return obj


def _default(o: object) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


_encode = _json.make_encoder(
    None, _default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
)
_estr = _json.encode_basestring_ascii


def dumps(obj: Any, indent: int | None = None) -> str:
    """json.dumps(obj) or json.dumps(obj, indent=indent)."""
    if indent is None:
        if isinstance(obj, str):
            return str(_estr(obj))
        return "".join(_encode(obj, 0))
    return _pretty(obj, " " * indent, "\n")


def _key(k: object) -> str:
    if isinstance(k, str):
        return k
    if k is True or k is False or k is None:
        return dumps(k)
    return str(k)


def _pretty(o: Any, step: str, nl: str) -> str:
    if isinstance(o, dict):
        if not o:
            return "{}"
        inner = nl + step
        parts = [inner + _estr(_key(k)) + ": " + _pretty(v, step, inner) for k, v in o.items()]
        return "{" + ",".join(parts) + nl + "}"
    if isinstance(o, list | tuple):
        if not o:
            return "[]"
        inner = nl + step
        return "[" + ",".join(inner + _pretty(v, step, inner) for v in o) + nl + "]"
    return dumps(o)
