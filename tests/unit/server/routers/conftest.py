"""The real FastAPI app over the in-memory daemon, called in-process through ASGI."""

from __future__ import annotations

import pytest

from vzkit.server.app import create_app
from vzkit.server.remote import RemoteAccess

from ..asgi import AsgiClient
from ..conftest import Daemon


@pytest.fixture
def api(daemon: Daemon) -> AsgiClient:
    remote = RemoteAccess(daemon.db, daemon.settings.state_dir / "pki", None)
    return AsgiClient(create_app(daemon.services, lambda: None, remote))
