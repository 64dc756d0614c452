"""Process liveness from /proc, for processes that are not our children.

Kept free of heavy imports: the CLI uses it too.
"""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """Whether pid runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses.
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X", "")
