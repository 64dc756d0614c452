"""Local argument checks, done before the daemon is contacted.

Every bound comes from ``vzkit.api.bounds``, the same module the API's models check with,
so the CLI refuses exactly what the API would. It does not import pydantic: importing the
models costs ~100 ms, a large share of the start-up budget of ``vz run``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from vzkit.api import bounds
from vzkit.api.bounds import NAME_RE, NAME_RULE, OutOfBounds
from vzkit.errors import InvalidConfig

T = TypeVar("T")


class UsageError(InvalidConfig):
    """Bad command-line input, found without asking the daemon; the CLI exits 2."""


def _checked(check: Callable[[], T]) -> T:
    """``check()``, an OutOfBounds from it as a UsageError."""
    try:
        return check()
    except OutOfBounds as exc:
        raise UsageError(str(exc), hint=exc.hint) from None


def check_name(name: str, what: str = "instance") -> str:
    if not NAME_RE.match(name):
        raise UsageError(f"invalid {what} name {name!r}", hint=NAME_RULE)
    return name


def check_memory(value: str, type: str | None = None) -> int:
    """--memory SIZE (a bare number is MiB) for an instance of ``type``, if known."""
    return _checked(lambda: bounds.check_memory(bounds.parse_size(value, default_unit="mib"), type))


def check_volume_size(value: str) -> int:
    """--size SIZE of a volume (a bare number is MiB)."""
    return _checked(lambda: bounds.check_volume_size(bounds.parse_size(value, default_unit="mib")))


def check_cpus(value: int) -> int:
    return _checked(lambda: bounds.check_cpus(value))


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"invalid {what} {value!r}", hint="give a whole number") from None


def check_cpus_text(value: str) -> int:
    return check_cpus(_int(value, "limits.cpus"))


def check_cpu_weight_text(value: str) -> int:
    return check_cpu_weight(_int(value, "limits.cpu_weight"))


def check_processes_text(value: str) -> int:
    return _checked(lambda: bounds.check_processes(_int(value, "limits.processes")))


def check_cpu_weight(value: int) -> int:
    return _checked(lambda: bounds.check_cpu_weight(value))


def parse_cpu_list(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3], the cpuset list syntax."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if first < 0 or last < first:
                raise ValueError(part)
            cpus.update(range(first, last + 1))
    except ValueError:
        raise UsageError(
            f"invalid CPU list {text!r}", hint="list host CPUs like 0,2-3 (see vz host info)"
        ) from None
    return sorted(cpus)


def parse_settings(items: list[str], keys: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """KEY=VALUE arguments, each value checked by its key's parser."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise UsageError(
                f"invalid setting {item!r}",
                hint="use KEY=VALUE with KEY one of " + ", ".join(keys),
            )
        out[key] = keys[key](value)
    return out


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise UsageError(f"invalid boolean {text!r}", hint="use true or false")


def parse_nic(spec: str) -> dict[str, str]:
    """'lab,ip=10.90.0.5,mac=0a:..' -> {"network": "lab", "ip": ..., "mac": ...}."""
    name, *opts = spec.split(",")
    nic = {"network": check_name(name, "network")}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("ip", "mac", "name") or not value:
            raise UsageError(
                f"invalid --network option {opt!r}",
                hint="use --network NAME[,ip=ADDR][,mac=MAC][,name=IFNAME], or --network none",
            )
        nic[key] = value
    return nic


def _port_number(text: str, what: str, hint: str) -> int:
    lo, hi = bounds.PORT_RANGE
    if not text.isascii() or not text.isdigit() or not lo <= int(text) <= hi:
        raise UsageError(f"invalid {what} {text!r}: a number from {lo} to {hi}", hint=hint)
    return int(text)


def _proto(text: str, hint: str) -> str:
    if text not in ("tcp", "udp"):
        raise UsageError(f"invalid protocol {text!r}: tcp or udp", hint=hint)
    return text


def parse_port(spec: str) -> dict[str, Any]:
    """'8080:80/tcp' -> {"host_port": 8080, "port": 80, "proto": "tcp"}."""
    hint = "use HOSTPORT:PORT[/tcp|udp], e.g. 8080:80"
    ports, _, proto = spec.partition("/")
    host, sep, guest = ports.partition(":")
    if not sep:
        raise UsageError(f"invalid port forward {spec!r}", hint=hint)
    return {
        "host_port": _port_number(host, "host port", hint),
        "port": _port_number(guest, "instance port", hint),
        "proto": _proto(proto or "tcp", hint),
    }


def parse_host_port(spec: str) -> tuple[int, str]:
    """'8080/udp' -> (8080, "udp")."""
    hint = "use HOSTPORT[/tcp|udp], e.g. 8080"
    port, _, proto = spec.partition("/")
    return _port_number(port, "host port", hint), _proto(proto or "tcp", hint)


def check_timeout(value: float | None, flag: str = "--timeout") -> float | None:
    if value is not None and value <= 0:
        raise UsageError(f"{flag} {value:g} must be positive", hint=f"e.g. {flag} 30")
    return value


def check_stop_timeout(value: float) -> float:
    """--timeout of stop and restart: how long a clean stop may take."""
    check_timeout(value)
    if value > bounds.MAX_STOP_TIMEOUT:
        raise UsageError(
            f"--timeout {value:g} is too long",
            hint=f"at most {bounds.MAX_STOP_TIMEOUT:g} seconds; --force stops at once",
        )
    return value


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise UsageError(
                f"invalid --env {pair!r}", hint="use --env NAME=VALUE, e.g. --env LANG=C"
            )
        env[key] = value
    return env


def parse_mode(value: str, *, allow_setid: bool = False) -> int:
    """--mode: octal permissions; setuid and setgid only with --allow-setid."""
    try:
        return bounds.parse_file_mode(value, allow_setid=allow_setid)
    except OutOfBounds as exc:
        raise UsageError(f"invalid --mode {value!r}: {exc.reason}", hint=exc.hint) from None


def check_mode(mode: int, what: str, allow_setid: bool) -> int:
    """A mode taken from elsewhere (a local file's) against the same rule."""
    try:
        return bounds.check_file_mode(mode, allow_setid=allow_setid)
    except OutOfBounds as exc:
        raise UsageError(f"{what} {mode:04o} {exc.reason}", hint=exc.hint) from None


def split_remote(spec: str, flag: str) -> tuple[str, str]:
    """Split ``NAME:/abs/path``."""
    name, sep, path = spec.partition(":")
    example = "web:/etc/motd"
    if not sep or not name:
        raise UsageError(
            f"{flag} {spec!r} is not of the form NAME:/path",
            hint=f"write the guest side as NAME:/absolute/path, e.g. {example}",
        )
    check_name(name)
    if not path.startswith("/"):
        raise UsageError(
            f"the guest path in {spec!r} is not absolute",
            hint=f"write the guest side as NAME:/absolute/path, e.g. {example}",
        )
    return name, path
