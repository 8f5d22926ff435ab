"""Logging for the server and workers: text or JSON lines, secrets scrubbed.

`configure_logging` installs one handler on the root logger, writing to
stderr:

* ``text``: ``2024-05-01 12:00:00,123 INFO    csvimg.engine: message``;
* ``json``: one object per line with ``time`` (ISO-8601 UTC), ``level``,
  ``logger``, ``message`` and, when the log call passed them through
  ``extra=``, `FIELDS` (``request_id``, ``item_id``, ``error_code``,
  ``event_id``, ``webhook_id``, ``owner``); a traceback goes in
  ``exception``.

Its `RedactingFilter` rewrites every record before it is written: message
*and* arguments (the message is formatted, scrubbed and stored back),
traceback and string fields. It replaces

* webhook secrets (``whsec_...``),
* ``Bearer`` / ``Basic`` credentials,
* the configured API keys (`register_secrets`; ``create_app`` registers
  ``CSVIMG_API_KEYS`` itself),
* URL userinfo (``https://user:pass@host`` -> ``https://***@host``),
* values of query parameters whose name looks secret (``token``,
  ``secret``, ``key``, ``sig``, ``auth``, ``pass``, ``credential``,
  ``session``, ``code``: ``?X-Amz-Signature=...`` -> ``?X-Amz-Signature=***``)

with ``***``. Applications embedding csvimg with their own logging add
``RedactingFilter()`` to their handlers to get the same.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "FIELDS",
    "FORMATS",
    "LEVELS",
    "JsonFormatter",
    "RedactingFilter",
    "configure_logging",
    "redact",
    "register_secrets",
]

LEVELS: Final = ("debug", "info", "warning", "error", "critical")
"""Accepted values of *level* (case-insensitive)."""

FORMATS: Final = ("text", "json")
"""Accepted values of *fmt*."""

FIELDS: Final = ("request_id", "item_id", "error_code", "event_id", "webhook_id", "owner")
"""``extra=`` fields copied into JSON lines when a log call passes them."""

TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
"""The ``text`` line layout."""

MASK: Final = "***"

# At least 8 characters, so prose ("basic checks") is left alone.
_TOKEN: Final = r"[A-Za-z0-9\-._~+/]{8,}=*"  # noqa: S105 - a pattern, not a password
_PATTERNS: Final = (
    (re.compile(r"whsec_[A-Za-z0-9+/=]*"), "whsec_" + MASK),
    (re.compile(r"(?i)\b(bearer|basic)(\s+)" + _TOKEN), r"\1\2" + MASK),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@'\"<>]*@"), r"\1" + MASK + "@"),
    (
        re.compile(
            r"(?i)([?&][^=&#\s'\"<>]*"
            r"(?:token|secret|key|sig|auth|pass|pwd|credential|session|code)"
            r"[^=&#\s'\"<>]*=)[^&#\s'\"<>]+"
        ),
        r"\1" + MASK,
    ),
)

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_pattern: re.Pattern[str] | None = None

_MARK: Final = "_csvimg_handler"


def register_secrets(secrets: Iterable[str]) -> None:
    """Add literal strings (API keys...) that `redact` always masks, process-wide."""
    global _secrets_pattern
    with _secrets_lock:
        _secrets.update(s for s in secrets if s)
        ordered = sorted(_secrets, key=len, reverse=True)  # longest first: no partial masks
        _secrets_pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None


def redact(text: str) -> str:
    """Return *text* with every secret the module docstring lists replaced by ``***``."""
    pattern = _secrets_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


_EXC_FORMATTER: Final = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Scrub secrets from a record (message, arguments, traceback, string fields).

    The message is formatted with its arguments first, so a secret passed
    as an argument is caught too; the record then carries the scrubbed
    text and no arguments.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite *record* in place; never drops it."""
        try:
            message = record.getMessage()
        except Exception:  # a broken log call: logging reports it itself
            return True
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _EXC_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name in FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, redact(value))
        return True


def _iso(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring for the keys."""

    def format(self, record: logging.LogRecord) -> str:
        """Return *record* as a single line of JSON."""
        data: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(data, ensure_ascii=False, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr at *level* (`LEVELS`) in format *fmt* (`FORMATS`), scrubbed.

    Replaces the handler an earlier call installed (other handlers on the
    root logger are left alone), sets the root level, and keeps ``httpx``
    at WARNING or above (it logs every download's full URL). Raises
    `ValueError` for an unknown level or format. ``csvimg serve`` should
    run uvicorn with ``log_config=None`` so its lines come here too.
    """
    name = level.strip().lower()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    numeric = logging.getLevelName(name.upper())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter())
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("httpx").setLevel(max(logging.WARNING, numeric))
