"""The bounds of every value a user gives: names, sizes, CPUs, ports, file modes.

Defined once, here, and used by the wire models (so the API and the SDK refuse the same
things) and by the CLI's local checks (``vzkit.cli.checks``), so the CLI refuses exactly
what the API would. Kept free of pydantic so the CLI can check its arguments without paying
for that import (a large share of ``vz run``'s start-up budget).

A value out of bounds raises :class:`OutOfBounds`, a ``ValueError`` (what pydantic
validators raise) that carries a hint for the CLI's and the API's error messages.
"""

from __future__ import annotations

import re

# -- names ------------------------------------------------------------------------------------

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


class OutOfBounds(ValueError):
    """A value outside its bounds: ``subject`` names the value, ``reason`` says what is wrong
    with it, ``hint`` what is accepted."""

    def __init__(self, subject: str, reason: str, hint: str | None = None) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject
        self.reason = reason
        self.hint = hint


# -- sizes ------------------------------------------------------------------------------------

KiB, MiB, GiB, TiB, PiB = 1024, 1024**2, 1024**3, 1024**4, 1024**5

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": 1000,
    "kib": KiB,
    "m": MiB,
    "mb": 1000**2,
    "mib": MiB,
    "g": GiB,
    "gb": 1000**3,
    "gib": GiB,
    "t": TiB,
    "tb": 1000**4,
    "tib": TiB,
    "p": PiB,
    "pb": 1000**5,
    "pib": PiB,
}
# ASCII digits only: \d would also take other scripts' digits, which int() accepts. At most
# 40 of them: longer is no size, and int() refuses past 4300 digits with an error of its own.
_SIZE_RE = re.compile(r"^\s*([0-9]{1,40}(?:\.[0-9]{1,40})?)\s*([a-zA-Z]*)\s*\Z")
# The largest size anything takes (memory, volumes), as the API documents it. qcow2 with its
# default 64 KiB clusters ends at 2 PiB and qemu-img fails below that already; 1 PiB leaves a
# margin, is more than any host has, and keeps every size far inside a 64-bit integer.
MAX_SIZE = PiB
SIZE_HINT = "give a number with a binary unit, e.g. 512MiB, 20GiB or 1TiB (at most 1PiB)"


def parse_size(value: str | int, *, default_unit: str = "", maximum: int = MAX_SIZE) -> int:
    """'512MiB', '1G', '1.5GiB', '1PiB', a number string (of ``default_unit``) or an int
    (bytes), in bytes; at most ``maximum``."""
    if isinstance(value, bool):  # an int to Python, never a size to a user
        raise OutOfBounds(f"invalid size {value!r}", "not a number", SIZE_HINT)
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise OutOfBounds(
                f"invalid size {value!r}",
                "use a number with a unit such as 512MiB or 2GiB",
                SIZE_HINT,
            )
        factor = _UNITS[m.group(2).lower() or default_unit]
        # Integer arithmetic: exact, and no float overflow for absurdly long numbers.
        whole, _, frac = m.group(1).partition(".")
        size = int(whole) * factor + (int(frac) * factor // 10 ** len(frac) if frac else 0)
    if size < 0:
        raise OutOfBounds(f"invalid size {value!r}", "negative", SIZE_HINT)
    if size > maximum:
        raise OutOfBounds(f"invalid size {value!r}", f"at most {format_size(maximum)}", SIZE_HINT)
    return size


def format_size(n: int) -> str:
    for unit, factor in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor:
            v = n / factor
            return f"{v:g}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


# -- instances --------------------------------------------------------------------------------

# The least memory each instance type runs in, measured here by booting the minimal image
# (Debian's cloud kernel, TCG) at falling sizes and running a command through the agent:
# a micro-VM ran at 80 MiB and not at 64 (the kernel, 51 MiB unpacked, is out of memory
# before /init), a q35 VM at 96 MiB and not at 80; a container, which only pays for its own
# processes, at 2 MiB and not at 1. Each floor leaves a margin above what ran (a newer
# kernel unpacks larger); a container's is about Docker's (6 MiB) for the same reason.
MIN_MEMORY = {"microvm": 96 * MiB, "vm": 128 * MiB, "container": 8 * MiB}
# What a limits change checks when it cannot know the type (PATCH without the instance).
MIN_ANY_MEMORY = min(MIN_MEMORY.values())
MAX_MEMORY = MAX_SIZE
MAX_CPUS = 256
CPU_WEIGHT = (1, 10000)
MAX_STOP_TIMEOUT = 3600.0


def check_memory(size: int, type: str | None = None) -> int:
    """``size`` bytes of memory for an instance of ``type`` (None: any type)."""
    least = MIN_MEMORY.get(type, MIN_ANY_MEMORY) if type else MIN_ANY_MEMORY
    what = f"a {type}" if type else "an instance"
    if size < least:
        raise OutOfBounds(
            f"memory {format_size(size)} is too small for {what}",
            f"at least {format_size(least)}",
            f"give it {format_size(least)} or more, e.g. 256MiB",
        )
    if size > MAX_MEMORY:
        raise OutOfBounds(
            f"memory {format_size(size)} is too large", f"at most {format_size(MAX_MEMORY)}"
        )
    return size


def check_cpus(n: int) -> int:
    if not 1 <= n <= MAX_CPUS:
        raise OutOfBounds(f"cpus {n}", "out of range", f"use 1 to {MAX_CPUS} vCPUs")
    return n


def check_cpu_weight(n: int) -> int:
    lo, hi = CPU_WEIGHT
    if not lo <= n <= hi:
        raise OutOfBounds(f"cpu weight {n}", "out of range", f"use {lo} to {hi} (100 = normal)")
    return n


# limits.processes: a container's processes and threads (its cgroup's pids.max). The
# default is podman's; the floor leaves room for the init, an exec and its shell; the
# ceiling is the kernel's largest pid_max.
PROCESSES = (16, 4_194_304)
DEFAULT_PROCESSES = 2048


def check_processes(n: int) -> int:
    lo, hi = PROCESSES
    if not lo <= n <= hi:
        raise OutOfBounds(
            f"limits.processes {n}",
            "out of range",
            f"use {lo} to {hi} ({DEFAULT_PROCESSES} by default)",
        )
    return n


# -- volumes ----------------------------------------------------------------------------------

MIN_VOLUME_SIZE = MiB
MAX_VOLUME_SIZE = MAX_SIZE


def check_volume_size(size: int) -> int:
    if not MIN_VOLUME_SIZE <= size <= MAX_VOLUME_SIZE:
        raise OutOfBounds(
            f"volume size {format_size(size)}",
            "out of range",
            f"give {format_size(MIN_VOLUME_SIZE)} to {format_size(MAX_VOLUME_SIZE)}, e.g. 10GiB",
        )
    return size


# -- ports ------------------------------------------------------------------------------------

PORT_RANGE = (1, 65535)

# -- files ------------------------------------------------------------------------------------

SETID_BITS = 0o6000  # S_ISUID | S_ISGID
MODE_HINT = "give octal permissions, e.g. 0644 or 0755"


def parse_file_mode(text: str, *, allow_setid: bool = False) -> int:
    """An octal permission mode (``0644``, ``755``, ``0o600``) for a file put into an instance.

    Setuid and setgid bits are refused unless asked for: a file API that makes setuid
    binaries by default hands whoever can push files a root shell in the guest.
    """
    digits = text[2:] if text.lower().startswith("0o") else text
    if not digits or not all(c in "01234567" for c in digits):
        raise OutOfBounds(f"invalid file mode {text!r}", "not an octal number", MODE_HINT)
    mode = int(digits, 8)
    if mode > 0o7777:
        raise OutOfBounds(f"invalid file mode {text!r}", "more than 4 octal digits", MODE_HINT)
    return check_file_mode(mode, allow_setid=allow_setid)


def check_file_mode(mode: int, *, allow_setid: bool = False) -> int:
    if mode & SETID_BITS and not allow_setid:
        raise OutOfBounds(
            f"file mode {mode:04o}",
            "sets the setuid or setgid bit",
            "drop those bits (e.g. 0755), or ask for them explicitly "
            "(vz file push --allow-setid; API: ?allow_setid=true)",
        )
    return mode
