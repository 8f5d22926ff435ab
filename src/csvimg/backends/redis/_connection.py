"""What the Redis backends share: the URL, the client, error mapping, encoding.

`_Connection` reads a backend URL (where to connect, the key prefix) and
builds the redis-py client; its `_Connection.errors` turns redis-py's
exceptions into `csvimg.StorageError`. The small helpers format times
(`_t`), decode script replies (`_pairs`) and JSON the way both backends
write them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    RedisError,
    TimeoutError,
)

from csvimg._errors import ConfigError, StorageError

DEFAULT_PREFIX: Final = "csvimg"
"""Key prefix used when the URL has no ``prefix`` query parameter."""


def _t(value: float) -> str:
    """Format a time for Redis: exact (repr) and understood as a zset score."""
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return repr(float(value))


def _opt_int(raw: str | None) -> int | None:
    return None if raw is None else int(raw)


def _opt_float(raw: str | None) -> float | None:
    return None if raw is None else float(raw)


def _pairs(raw: Sequence[str]) -> dict[str, str]:
    """Turn a flat HGETALL reply of a script into a dict."""
    return dict(zip(raw[0::2], raw[1::2], strict=True))


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@attrs.frozen
class _Connection:
    """What a Redis backend URL says: where to connect and the key prefix."""

    client_url: str
    prefix: str
    where: str

    @classmethod
    def parse(cls, url: str) -> _Connection:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "redis+unix", "unix"):
            raise ConfigError(f"not a Redis URL: {url!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [v for k, v in query if k == "prefix"]
        prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
        if not prefix or any(c.isspace() or c in "*?[]" for c in prefix):
            raise ConfigError(f"invalid Redis key prefix {prefix!r} in {url!r}")
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        # redis-py spells the socket scheme unix://; redis+unix:// names the
        # engine in our URL space, where "unix" alone would say nothing.
        client_scheme = "unix" if scheme == "redis+unix" else scheme
        client_url = urlunsplit((client_scheme, parts.netloc, parts.path, rest, ""))
        if client_scheme == "unix" and not parts.netloc:
            # urlunsplit drops the empty authority: unix:/path; keep unix:///path.
            client_url = f"unix://{client_url.removeprefix('unix:')}"
        host = parts.hostname or parts.path or "localhost"
        where = f"{scheme}://{host}" + (f":{parts.port}" if parts.port else "")
        return cls(client_url=client_url, prefix=prefix, where=where)

    def client(self) -> aioredis.Redis:
        # Retry connection trouble a few times with back-off: a restarted or
        # failed-over server is picked up without the caller noticing, and
        # a longer outage surfaces as StorageError after well under a second.
        return aioredis.Redis.from_url(
            self.client_url,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
            retry_on_error=[ConnectionError, TimeoutError],
            health_check_interval=10,
            socket_connect_timeout=5,
            socket_keepalive=True,
        )

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn redis-py's exceptions into `StorageError`."""
        try:
            yield
        except BusyLoadingError as exc:
            raise StorageError(
                f"Redis at {self.where} is still loading its data while {doing}; try again"
            ) from exc
        except (ConnectionError, TimeoutError) as exc:
            raise StorageError(
                f"Redis at {self.where} is unreachable while {doing}: {exc} "
                "(is redis-server running, and is the URL right?)"
            ) from exc
        except RedisError as exc:
            raise StorageError(f"Redis at {self.where} failed while {doing}: {exc}") from exc


async def _aclose(client: aioredis.Redis) -> None:
    # redis-py >= 5 spells it aclose(); close() is its deprecated alias.
    closer = getattr(client, "aclose", None) or client.close
    with contextlib.suppress(RedisError, OSError):
        await closer()
