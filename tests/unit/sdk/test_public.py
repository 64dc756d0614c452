"""What `import vzkit` offers: the clients and the error classes, and nothing more."""

from __future__ import annotations

import subprocess
import sys

import vzkit
from vzkit.sdk.aclient import AsyncClient
from vzkit.sdk.client import Client


def test_public_names() -> None:
    assert sorted(vzkit.__all__) == [
        "AsyncClient",
        "Client",
        "Conflict",
        "EngineError",
        "HostUnsupported",
        "InvalidConfig",
        "NotFound",
        "ResourceExhausted",
        "StateError",
        "VzError",
        "__version__",
    ]
    for name in vzkit.__all__:
        assert getattr(vzkit, name) is not None
    assert vzkit.Client is Client and vzkit.AsyncClient is AsyncClient


def test_import_vzkit_stays_light() -> None:
    # vz-runtime starts through the package: the SDK loads only when asked for.
    code = "import sys, vzkit; print(sorted(m for m in sys.modules if m.startswith('vzkit')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['vzkit', 'vzkit.errors']"
