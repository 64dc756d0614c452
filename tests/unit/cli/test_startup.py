"""`vz` start-up: no pydantic and no websockets before the first request reaches vzd.

Both cost tens of milliseconds, and `vz run` sits inside the boot benchmark. The models are
imported when an answer is parsed, websockets when a WebSocket opens (`vz run` and `vz exec`
start importing what they will need in a background thread, while vzd works).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Runs the CLI with the transport's request replaced by a probe: at the first request it
# notes which heavy modules are loaded, then fails as an unreachable daemon would.
PROBE = """
import json, sys
from vzkit.sdk import transport
seen = {}
def first_request(self, method, url, **kw):
    if not seen:
        loaded = set(sys.modules)
        seen.update(pydantic="pydantic" in loaded, websockets="websockets" in loaded)
    raise self.unavailable("probe")
transport.UnixTransport.request = first_request
from vzkit.cli.main import main
main(sys.argv[1:])
print(json.dumps(seen))
"""

COMMANDS = [
    ["list"],
    ["info", "web"],
    ["launch", "minimal", "web"],
    ["start", "web"],
    ["config", "set", "web", "limits.memory=512MiB"],
    ["file", "push", "-", "web:/x"],
    ["network", "list"],
    ["snapshot", "list", "web"],
    ["volume", "list"],
    ["image", "list"],
    ["host", "info"],
    ["daemon", "status"],
    ["trust", "list"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_no_pydantic_or_websockets_before_the_first_request(
    tmp_path: Path, argv: list[str]
) -> None:
    seen = _probe(tmp_path, argv)
    assert seen == {"pydantic": False, "websockets": False}


def test_run_imports_no_pydantic_before_the_first_request(tmp_path: Path) -> None:
    # websockets may be loading already: vz run starts importing it in the background.
    seen = _probe(tmp_path, ["run", "minimal", "--", "true"])
    assert seen["pydantic"] is False


def test_loading_the_cli_loads_neither() -> None:
    code = (
        "import sys, vzkit.cli.main; "
        "print(sorted(m for m in ('pydantic', 'websockets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _probe(tmp_path: Path, argv: list[str]) -> dict[str, bool]:
    env = {
        "VZ_SOCKET": str(tmp_path / "vzd.sock"),
        "VZ_STATE_DIR": str(tmp_path / "state"),
        "VZ_CONFIG_DIR": str(tmp_path / "config"),
        "PATH": "/usr/bin:/bin",
    }
    r = subprocess.run(
        [sys.executable, "-c", PROBE, "--no-autostart", *argv],
        capture_output=True,
        text=True,
        env=env,
        input="",
        timeout=60,
    )
    seen: dict[str, bool] = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen, f"the CLI sent no request: {r.stderr}"
    return seen
