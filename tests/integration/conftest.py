"""Fixtures of the integration tests (the shared ones live in tests/conftest.py)."""

from tests.integration.netns import netd

__all__ = ["netd"]
