"""Local argument checks, done before the daemon is contacted.

Name and size rules come from ``vzkit.api.bounds``, which does not import pydantic: importing
the models costs ~100 ms, a large share of the start-up budget of ``vz run``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from vzkit.api.bounds import NAME_RE, NAME_RULE, PROCESSES, parse_size
from vzkit.errors import InvalidConfig


class UsageError(InvalidConfig):
    """Bad command-line input, found without asking the daemon; the CLI exits 2."""


def check_name(name: str, what: str = "instance") -> str:
    if not NAME_RE.match(name):
        raise UsageError(f"invalid {what} name {name!r}", hint=NAME_RULE)
    return name


def check_memory(value: str) -> int:
    try:
        n = parse_size(value, default_unit="mib")
    except ValueError as exc:
        raise UsageError(
            str(exc), hint="e.g. --memory 512MiB or --memory 1G (a bare number is MiB)"
        ) from None
    if n < 16 * 1024**2:
        raise UsageError(
            f"--memory {value} is too small", hint="give the guest at least 16MiB, e.g. 256MiB"
        )
    return n


def check_cpus(value: int) -> int:
    if not 1 <= value <= 256:
        raise UsageError(f"--cpus {value} is out of range", hint="use 1 to 256 vCPUs")
    return value


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
    n = _int(value, "limits.processes")
    if not PROCESSES[0] <= n <= PROCESSES[1]:
        raise UsageError(
            f"limits.processes {value} is out of range",
            hint=f"use {PROCESSES[0]} to {PROCESSES[1]} (2048 by default)",
        )
    return n


def check_cpu_weight(value: int) -> int:
    if not 1 <= value <= 10000:
        raise UsageError(
            f"--cpu-weight {value} is out of range", hint="use 1 to 10000 (100 = normal)"
        )
    return value


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
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"invalid {what} {text!r}: a number from 1 to 65535", hint=hint)
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


def parse_mode(value: str) -> int:
    text = value[2:] if value.lower().startswith("0o") else value
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise UsageError(
            f"invalid --mode {value!r}", hint="give octal permissions, e.g. --mode 0644"
        )
    return mode


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
