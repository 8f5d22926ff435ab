"""Checks for the external services some tests need (Redis, RabbitMQ...).

A test that needs a service calls `require_service` (or a wrapper such as
`redis_url`) first. When the service does not answer the test is skipped
with a message saying how to enable it, except when the environment sets
``CSVIMG_REQUIRE_SERVICES=1`` (CI does): then it fails, so a missing
service can never turn a green run into a run that tested nothing::

    from services import redis_url

    @pytest.fixture
    def url() -> str:
        return redis_url()          # skips (or fails) when Redis is down
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

__all__ = [
    "DEFAULT_REDIS_URL",
    "REQUIRE_ENV",
    "missing",
    "redis_url",
    "require_program",
    "require_service",
]

REQUIRE_ENV = "CSVIMG_REQUIRE_SERVICES"
"""Set to ``1`` to make a missing service fail the test instead of skipping it."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
"""Where the Redis tests look when ``CSVIMG_REDIS_URL`` is not set (db 15)."""


def missing(what: str, how_to_enable: str) -> NoReturn:
    """Skip the running test because *what* is unavailable (fail under REQUIRE_ENV)."""
    message = f"{what}; {how_to_enable}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def require_service(
    name: str, host: str, port: int, how_to_enable: str, *, timeout: float = 1.0
) -> None:
    """Skip (or fail) unless something accepts TCP connections at *host*:*port*."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        missing(f"{name} is not reachable at {host}:{port} ({exc})", how_to_enable)


def require_program(name: str, how_to_enable: str) -> str:
    """Return the path of executable *name*; skip (or fail) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (not on PATH)", how_to_enable)
    return path


def redis_url() -> str:
    """Return ``CSVIMG_REDIS_URL`` (default `DEFAULT_REDIS_URL`) once Redis answers there."""
    url = os.environ.get("CSVIMG_REDIS_URL") or DEFAULT_REDIS_URL
    how = (
        "start Redis (e.g. `redis-server --port 6379 --save ''`) "
        "or set CSVIMG_REDIS_URL=redis://host:port/db to a server the tests may use"
    )
    parts = urlsplit(url)
    if parts.scheme in ("unix", "redis+unix"):
        path = parts.path
        if not os.path.exists(path):
            missing(f"Redis socket {path} does not exist", how)
        return url
    require_service("Redis", parts.hostname or "127.0.0.1", parts.port or 6379, how)
    return url
