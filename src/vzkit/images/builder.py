"""What an image builder is to the store: the contract both sides import.

Kept apart from ``store`` so that the builders (``initramfs``, ``debian``) and the store
import this module and never each other's: the store knows the builders by name, the
builders do not know the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vzkit.settings import Settings

__all__ = ["BuildResult", "Builder", "BuilderFactory", "Progress", "sha256_file"]

Progress = Callable[[str, float | None], None]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class BuildResult:
    """What a builder produced: role -> file inside the build's work dir."""

    files: dict[str, Path]
    kernel_release: str
    cmdline: str = ""


class Builder(Protocol):
    kind: str

    def inputs(self) -> dict[str, str]:
        """Everything the build reads, cheaply described; it becomes the inputs key."""
        ...

    def build(self, workdir: Path, progress: Progress) -> BuildResult: ...


BuilderFactory = Callable[[Settings], Builder]
