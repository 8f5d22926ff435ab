"""Small helpers several modules share: log-safe URLs, ``Retry-After``, lazy names, env numbers.

Nothing here imports more than the standard library (and csvimg's errors), so any module (the
fetcher, the webhook notifier, the backends, the server's commands) can
use it without pulling in aiohttp or Pillow.
"""

from __future__ import annotations

import base64
import email.utils
import importlib
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from csvimg._errors import ConfigError

__all__ = [
    "RETRY_AFTER_CAP",
    "env_float",
    "env_int",
    "lazy_exports",
    "mask_password",
    "new_secret",
    "parse_retry_after",
    "redact_url",
]

RETRY_AFTER_CAP: Final = 3600.0
"""Default cap of `parse_retry_after`: a longer wait is a server mistake or a ban."""

_MAX_SHOWN_PATH: Final = 200


def redact_url(url: str) -> str:
    """*url* without userinfo and query, fit for logs and error messages.

    ``https://user:pw@host:8443/a.jpg?token=x`` becomes
    ``https://host:8443/a.jpg?...``; a path is cut after 200 characters and
    a URL that does not parse is shown as ``<malformed URL>``.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if not parts.scheme or not host:
        return parts.path[:_MAX_SHOWN_PATH] or "<empty URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path
    if len(path) > _MAX_SHOWN_PATH:
        path = path[:_MAX_SHOWN_PATH] + "..."
    return f"{parts.scheme}://{netloc}{path}" + ("?..." if parts.query else "")


def mask_password(url: str) -> str:
    """*url* with the password of its userinfo replaced by ``***``.

    For backend URLs (``redis://user:pw@host/0`` becomes
    ``redis://user:***@host/0``), where the rest of the URL is worth
    logging. A URL without a password is returned unchanged. The userinfo
    ends at the last ``@`` before the path, so a password holding an
    unescaped ``@`` is hidden whole.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostport}{tail}"


def parse_retry_after(
    value: str | None, *, now: float | None = None, cap: float = RETRY_AFTER_CAP
) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (a delay or an HTTP date).

    The result is between 0 and *cap*; None when *value* is missing, blank
    or unreadable (a date without a time zone included: HTTP dates are
    always UTC). *now* (default `time.time`) is what an HTTP date is
    counted from.
    """
    if value is None or not (value := value.strip()):
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" dates: HTTP dates are always UTC
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


def lazy_exports(namespace: dict[str, Any], names: Mapping[str, str]) -> Callable[[str], Any]:
    """Make a module ``__getattr__`` that imports each of *names* on first use.

    *names* maps an attribute to the module that defines it; *namespace* is
    the calling module's ``globals()``, where the value is kept once
    loaded. Use as ``__getattr__ = lazy_exports(globals(), {...})``, with
    the same names imported under ``if TYPE_CHECKING:`` for type checkers.
    An attribute not in *names* raises `AttributeError` as usual.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__


def env_int(env: Mapping[str, str], name: str, default: int, *, low: int | None = None) -> int:
    """The whole number in variable *name* of *env*, or *default* when unset or blank.

    Surrounding blanks are ignored; anything else than a whole number (at
    least *low* when given) raises `csvimg.ConfigError` naming the variable.
    """
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if low is not None and value < low:
        raise ConfigError(f"{name} must be at least {low}, not {raw!r}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    """The number (not negative) in variable *name* of *env*, or *default* when unset or blank.

    Anything else raises `csvimg.ConfigError` naming the variable.
    """
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if not value >= 0:  # also NaN
        raise ConfigError(f"{name} must not be negative, not {raw!r}")
    return value


def new_secret() -> str:
    """Return a fresh Standard Webhooks signing secret (``whsec_`` + base64 of 24 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
