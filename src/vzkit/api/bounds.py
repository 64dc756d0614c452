"""Names and sizes: rules shared by the models and the CLI's local checks.

Kept free of pydantic so the CLI can validate arguments without paying for its import.
"""

from __future__ import annotations

import re

# The rule as a JSON Schema (ECMAScript) pattern, which the API schema shows.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def anchored(pattern: str) -> re.Pattern[str]:
    """``pattern`` (``^...$``) compiled to match whole strings only: Python's ``$`` also
    matches before a final newline, which let names such as ``"web\\n"`` through."""
    return re.compile(pattern.removesuffix("$") + r"\Z")


NAME_RE = anchored(NAME_PATTERN)
NAME_RULE = (
    "names are 1-63 characters of lowercase letters, digits and '-', "
    "starting and ending with a letter or digit"
)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
# ASCII digits only: \d would also take other scripts' digits, which float() accepts.
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*\Z")
# Sizes are 64-bit signed integers wherever they go (SQLite, qemu-img, the kernel).
MAX_SIZE = 2**63 - 1

# limits.processes: a container's processes and threads (its cgroup's pids.max). The
# default is podman's; the floor leaves room for the init, an exec and its shell; the
# ceiling is the kernel's largest pid_max.
PROCESSES = (16, 4_194_304)
DEFAULT_PROCESSES = 2048


def parse_size(value: str | int, *, default_unit: str = "") -> int:
    """Parse '512MiB', '1G', '1.5GiB' or a plain byte count into bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {value!r}: use a number with a unit such as 512MiB or 2GiB")
    unit = m.group(2).lower() or default_unit
    size = float(m.group(1)) * _UNITS[unit]  # inf for a number too long for a float
    if size >= 2**63:
        raise ValueError(f"invalid size {value!r}: too large")
    return int(size)


def format_size(n: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            v = n / factor
            return f"{v:g}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
