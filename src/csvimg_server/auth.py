"""Optional API keys: ``CSVIMG_API_KEYS``, bearer tokens and owners.

Off by default (the single-user embedded mode). When ``CSVIMG_API_KEYS``
holds keys, every endpoint except the public ones (`PUBLIC_PATHS`,
`PUBLIC_PREFIXES`) answers ``401`` unless the request carries
``Authorization: Bearer <key>`` with one of them.

The variable is a comma-separated list; each entry is ``name:key`` or a
bare ``key``::

    CSVIMG_API_KEYS="alice:Zm9vYmFyYmF6cXV4MTIzNDU2,ops:..., 3q2+7w/c0ffee0123456789"

The *owner id* of a key is its name, or for a bare key ``key-`` and the
first 12 hex digits of its SHA-256 (never the key itself). Requests,
their items, output CSV, images and deliveries, and webhook registrations
belong to the owner that created them; other owners get 404. Several keys
may share a name (key rotation: both work, same owner). A key is 16 to
512 characters of ``A-Z a-z 0-9 - . _ ~ + / =`` (the RFC 6750 token
alphabet); a name is 1 to 64 of ``A-Z a-z 0-9 - . _ @``, starting with a
letter or digit.

Presented keys are compared in constant time (SHA-256 digests through
`hmac.compare_digest`, against every configured key); keys are never
logged, and error messages about a bad configuration never quote them.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Final

import attrs
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from csvimg._errors import ConfigError
from csvimg_server._bodies import Error
from csvimg_server._upload import DRAIN_BYTES

__all__ = [
    "ENV_VAR",
    "FROM_ENV",
    "OWNER_SCOPE_KEY",
    "PUBLIC_PATHS",
    "PUBLIC_PREFIXES",
    "ApiKeyAuth",
    "ApiKeys",
    "FromEnv",
    "is_public",
    "owner_of",
]

log = logging.getLogger("csvimg.server")

ENV_VAR: Final = "CSVIMG_API_KEYS"
"""The environment variable holding the keys."""

OWNER_SCOPE_KEY: Final = "csvimg.owner"
"""Where `ApiKeyAuth` puts the caller's owner id in the ASGI scope."""

PUBLIC_PATHS: Final = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json"})
"""Paths answered without a key: probes, the metrics scrape, the API document and the
upload page (which then asks the user for a key)."""

PUBLIC_PREFIXES: Final = ("/static/",)
"""Path prefixes answered without a key: the upload page's static files."""

_KEY: Final = re.compile(r"[A-Za-z0-9\-._~+/=]{16,512}\Z")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-._@]{0,63}\Z")
_REALM: Final = 'Bearer realm="csvimg"'


class FromEnv(enum.Enum):
    """The type of `FROM_ENV`: "read ``CSVIMG_API_KEYS`` from the environment"."""

    FROM_ENV = "from-env"


FROM_ENV: Final = FromEnv.FROM_ENV
"""Default of ``create_app(api_keys=...)``: read `ENV_VAR` from ``os.environ``."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@attrs.frozen(repr=False)
class _Entry:
    owner: str
    digest: bytes


@attrs.frozen(repr=False)
class ApiKeys:
    """A parsed, non-empty set of API keys and the owner id of each.

    Build it with `parse` or `from_env`. Its ``repr`` shows owners only.
    """

    _entries: tuple[_Entry, ...]
    _secrets: tuple[str, ...]

    @classmethod
    def parse(cls, value: str) -> ApiKeys | None:
        """Parse a ``CSVIMG_API_KEYS`` value; None when it is blank (keys off).

        Raises `ConfigError` for a malformed entry, a key given twice, or a
        value with no key at all; the message names the entry by position
        and never quotes a key.
        """
        if not value.strip():
            return None
        entries: list[_Entry] = []
        secrets: list[str] = []
        seen: set[bytes] = set()
        for position, raw in enumerate(value.split(","), start=1):
            entry = raw.strip()
            if not entry:
                continue
            name, colon, key = entry.rpartition(":")
            if colon and _NAME.match(name) is None:
                raise ConfigError(
                    f"{ENV_VAR}: entry {position}: the name before ':' must be 1 to 64 "
                    "characters of A-Z a-z 0-9 - . _ @, starting with a letter or digit"
                )
            if _KEY.match(key) is None:
                raise ConfigError(
                    f"{ENV_VAR}: entry {position}: a key must be 16 to 512 characters "
                    "of A-Z a-z 0-9 - . _ ~ + / ="
                )
            digest = _digest(key)
            if digest in seen:
                raise ConfigError(f"{ENV_VAR}: entry {position}: the same key is given twice")
            seen.add(digest)
            owner = name if colon else "key-" + digest.hex()[:12]
            entries.append(_Entry(owner, digest))
            secrets.append(key)
        if not entries:
            raise ConfigError(f"{ENV_VAR} is set but holds no key")
        return cls(tuple(entries), tuple(secrets))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiKeys | None:
        """Read `ENV_VAR` from *environ* (default ``os.environ``); None when unset."""
        env = os.environ if environ is None else environ
        return cls.parse(env.get(ENV_VAR, ""))

    @property
    def owners(self) -> frozenset[str]:
        """Every owner id (names, and ``key-<hash>`` for bare keys)."""
        return frozenset(e.owner for e in self._entries)

    def secrets(self) -> Iterator[str]:
        """The keys themselves, for the log redaction filter only."""
        return iter(self._secrets)

    def owner(self, token: str) -> str | None:
        """Return the owner id of *token*, or None when it is not a key.

        Constant time in the token: its digest is compared with every
        configured digest, without stopping at a match.
        """
        digest = _digest(token)
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.owner
        return found

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ApiKeys(owners={sorted(self.owners)!r})"


def is_public(path: str) -> bool:
    """Whether *path* is answered without a key (see `PUBLIC_PATHS`)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def owner_of(conn: HTTPConnection) -> str | None:
    """The owner id `ApiKeyAuth` found for this request (None when keys are off)."""
    owner = conn.scope.get(OWNER_SCOPE_KEY)
    return owner if isinstance(owner, str) else None


def _bearer(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    name: bytes
    value: bytes
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _unsent_body(scope: Scope) -> bool:
    """Whether the client may still be sending a large body we will not read."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            try:
                return int(value) > DRAIN_BYTES
            except ValueError:
                return True
    return False


class ApiKeyAuth:
    """ASGI middleware: ``401`` unless a non-public path carries a valid key.

    Everything not public is protected, so a route added later is never
    open by mistake (an unknown path is a 401 too, not a 404). On success
    the owner id goes into the scope (read it with `owner_of`).
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key of an HTTP request, then pass it on or answer 401."""
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        owner = self.keys.owner(token) if token is not None else None
        if owner is not None:
            scope[OWNER_SCOPE_KEY] = owner
            await self.app(scope, receive, send)
            return
        if token is None:
            message = "an API key is required: send 'Authorization: Bearer <key>'"
            challenge = _REALM
        else:
            message = "invalid API key"
            challenge = _REALM + ', error="invalid_token"'
            log.info("%s %s: refused an invalid API key", scope["method"], scope["path"])
        headers = {"WWW-Authenticate": challenge}
        if _unsent_body(scope):
            # Do not read (or let uvicorn drain) a large body from a stranger.
            headers["Connection"] = "close"
        response = Error(error=message).response(401, headers)
        await response(scope, receive, send)
