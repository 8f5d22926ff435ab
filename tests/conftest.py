"""Shared pytest configuration.

Async tests use the anyio pytest plugin on asyncio (``@pytest.mark.anyio``).
Fixtures for real servers live in ``tests/servers.py`` and
``tests/server_helpers.py``; service checks in ``tests/services.py``.
"""

from __future__ import annotations

import os

import pytest

# The shipped contract suite's asserts live in an installed module: have
# pytest rewrite them so failures show values (before anything imports it).
pytest.register_assert_rewrite("csvimg.testing")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def anyio_backend() -> str:
    """Run anyio tests on asyncio (the backend uvicorn and redis-py use)."""
    return "asyncio"
