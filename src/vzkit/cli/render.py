"""Output helpers for the CLI: tables, sizes, ages, build progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from vzkit.api.bounds import format_size

__all__ = ["format_size"]


def format_age(seconds: float) -> str:
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def age_since(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # the daemon speaks UTC
    return format_age(((now or datetime.now(UTC)) - when).total_seconds())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def key_values(pairs: Sequence[tuple[str, object]], out: TextIO) -> None:
    width = max((len(k) for k, _ in pairs), default=0) + 1
    for k, v in pairs:
        out.write(f"{k + ':':<{width}} {'-' if v is None or v == '' else v}\n")


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            pairs.extend(flatten(v, key + "."))
        elif isinstance(v, list):
            pairs.append((key, ", ".join(str(x) for x in v)))
        else:
            pairs.append((key, v))
    return pairs


def json_mode(args: Any) -> bool:
    """Whether the command was given --format json."""
    return bool(getattr(args, "format", None) == "json")


def show(args: Any, model: Any, text: str | None) -> int:
    """A command's answer: the model as JSON with --format json, else the line ``text``."""
    if json_mode(args):
        sys.stdout.write(model.model_dump_json(indent=2) + "\n")
    elif text:
        sys.stdout.write(text + "\n")
    return 0


def show_fields(args: Any, model: Any) -> int:
    """A resource's every field: as JSON with --format json, else one ``key: value`` a line."""
    if json_mode(args):
        return show(args, model, None)
    key_values(list(model.model_dump(mode="json").items()), sys.stdout)
    return 0


def dump_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


def dump_models(items: Sequence[Any], out: TextIO) -> None:
    """A list answer (instances, networks, volumes, ...) as ``--format json`` prints it."""
    dump_json([i.model_dump(mode="json") for i in items], out)


class Progress:
    """Build progress on stderr: one redrawn line with a bar on a terminal, plain lines else."""

    BAR = 24

    def __init__(self, label: str, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.label = label
        self.tty = self.out.isatty()
        self._last: tuple[str, int | None] | None = None
        self._drawn = False

    def __call__(self, step: str, fraction: float | None) -> None:
        pct = None if fraction is None else max(0, min(100, round(fraction * 100)))
        if self.tty:
            filled = 0 if pct is None else pct * self.BAR // 100
            bar = "#" * filled + "-" * (self.BAR - filled)
            tail = "" if pct is None else f" {pct:3d}%"
            self.out.write(f"\r\x1b[K{self.label} [{bar}]{tail} {step}")
            self._drawn = True
        else:
            # Plain logs: one line per step (or per 10% within a step) keeps them short.
            key = (step, None if pct is None else pct // 10)
            if key == self._last:
                return
            self._last = key
            self.out.write(f"{self.label}: {step}" + ("" if pct is None else f" ({pct}%)") + "\n")
        self.out.flush()

    def done(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self._drawn = False
