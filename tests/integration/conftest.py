"""Fixtures of the integration tests (the shared ones live in tests/conftest.py)."""

from tests.integration.netns import daemon_pair, netd

__all__ = ["daemon_pair", "netd"]
