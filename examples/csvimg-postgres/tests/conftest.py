"""PostgreSQL for the contract tests: one fresh schema per test.

``CSVIMG_POSTGRES_URL`` says where PostgreSQL is (default
``postgresql://postgres@127.0.0.1:5432/test``). Each test gets an empty
schema of its own, ``csvimg_test_<run>_<n>``, dropped after the test; the
session drops any left behind by this run. When PostgreSQL does not
answer, the tests skip with a message, unless ``CSVIMG_REQUIRE_SERVICES=1``
(as in CI): then they fail.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

# The contract's asserts live in an installed module: have pytest rewrite
# them so that a failure shows the values (before anything imports it).
pytest.register_assert_rewrite("csvimg.testing")

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
RUN = uuid.uuid4().hex[:8]
_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The server's URL, once it answers; drops this run's schemas at the end."""
    url = os.environ.get("CSVIMG_POSTGRES_URL", DEFAULT_URL)
    try:
        conn = psycopg.connect(url, connect_timeout=3, autocommit=True)
    except psycopg.Error as exc:
        message = (
            f"PostgreSQL is not reachable at {url} ({' '.join(str(exc).split())}); start it or set "
            "CSVIMG_POSTGRES_URL"
        )
        if os.environ.get("CSVIMG_REQUIRE_SERVICES") == "1":
            pytest.fail(
                f"{message} (CSVIMG_REQUIRE_SERVICES=1 makes this a failure)", pytrace=False
            )
        pytest.skip(message)
    with conn:
        yield url
        cur = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
            (f"csvimg_test_{RUN}_%",),
        )
        for (name,) in cur.fetchall():
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def schema_url(postgres_url: str) -> Iterator[str]:
    """A URL whose schema is new and empty; the schema is dropped afterwards."""
    schema = f"csvimg_test_{RUN}_{next(_numbers)}"
    separator = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{separator}schema={schema}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
