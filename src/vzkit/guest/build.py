"""Builds the static guest agent binary from the C source shipped in the package.

The binary is cached under the cache dir by the hash of its source and compiler, so a
changed agent is rebuilt and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vzkit.errors import EngineError, HostUnsupported
from vzkit.settings import Settings

AGENT_SOURCE = Path(__file__).parent / "agent" / "vz-agent.c"


def _compiler() -> list[str]:
    # musl gives a small, fully static binary; glibc -static works too (a little larger).
    if shutil.which("musl-gcc"):
        return ["musl-gcc", "-static", "-O2", "-s"]
    if shutil.which("gcc"):
        return ["gcc", "-static", "-O2", "-s"]
    raise HostUnsupported(
        "no C compiler found to build the guest agent",
        hint="install gcc and musl-tools (scripts/setup does this)",
    )


def agent_binary(settings: Settings) -> Path:
    """Return the path of a built agent, compiling it first if needed."""
    cmd = _compiler()
    source = AGENT_SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(cmd).encode()).hexdigest()[:16]
    out = settings.cache_dir / "agent" / key / "vz-agent"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / "vz-agent"
        proc = subprocess.run(
            [*cmd, "-Wall", "-o", str(tmp_out), str(AGENT_SOURCE)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise EngineError(
                f"building the guest agent failed: {proc.stderr.strip()[-2000:]}",
                hint="check that gcc/musl-gcc work and report the error",
            )
        os.replace(tmp_out, out)
    return out
