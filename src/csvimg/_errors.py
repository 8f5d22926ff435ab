"""The exception tree of csvimg.

Every exception the library raises on purpose derives from `CsvimgError`,
and each also subclasses the builtin it most resembles, so callers may
catch either::

    CsvimgError(Exception)
    ├── ConfigError(ValueError)            bad configuration or option
    │   ├── UnknownSchemeError             no backend serves a URL scheme
    │   ├── PluginError                    an installed plugin cannot be loaded
    │   └── CallbackUrlError               a webhook receiver URL is refused
    ├── ManifestError(ValueError)          the CSV was rejected (has .errors)
    ├── TransitionError(RuntimeError)      an illegal state-machine move
    ├── NotFoundError(KeyError)            unknown request, item or webhook
    ├── NotFinishedError(RuntimeError)     output asked of a running request
    ├── StorageError(RuntimeError)         a storage or queue backend failed
    └── ItemError(Exception)               one image could not be processed
        ├── FetchError                     download failed (code says why)
        └── CodecError                     decode/encode failed

`ItemError` carries a stable machine-readable ``code`` (``timeout``,
``blocked-address``, ``not-an-image`` ...), a human ``message`` and whether
trying again may help (``retryable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csvimg.manifest import Problem

__all__ = [
    "CallbackUrlError",
    "CodecError",
    "ConfigError",
    "CsvimgError",
    "FetchError",
    "ItemError",
    "ManifestError",
    "NotFinishedError",
    "NotFoundError",
    "PluginError",
    "StorageError",
    "TransitionError",
    "UnknownSchemeError",
]


class CsvimgError(Exception):
    """Root of every error csvimg raises on purpose."""


class ConfigError(CsvimgError, ValueError):
    """A configuration value or option is invalid."""


class UnknownSchemeError(ConfigError):
    """No registered backend serves the scheme of a backend URL."""

    def __init__(self, kind: str, url: str, known: Sequence[str]) -> None:
        self.kind = kind
        self.url = url
        self.known = sorted(known)
        scheme = url.split(":", 1)[0] if ":" in url else url
        super().__init__(
            f"no {kind} backend for scheme {scheme!r} (in {url!r}); "
            f"known schemes: {', '.join(self.known) or '(none)'}"
        )


class PluginError(ConfigError):
    """A third-party plugin (an entry point of the group ``csvimg``) cannot be loaded.

    ``plugin`` is the entry-point name, ``value`` what it points at and
    ``__cause__`` the original exception; the message says how to disable
    the plugin (``CSVIMG_DISABLED_PLUGINS``).
    """

    def __init__(self, plugin: str, value: str, cause: BaseException) -> None:
        self.plugin = plugin
        self.value = value
        super().__init__(
            f"csvimg plugin {plugin!r} (entry point {plugin} = {value!r} in the group "
            f"'csvimg') cannot be loaded: {type(cause).__name__}: {cause}. Install what "
            f"it needs, or disable it with CSVIMG_DISABLED_PLUGINS={plugin} "
            f"(a comma-separated list of entry-point names)"
        )


class CallbackUrlError(ConfigError):
    """A webhook receiver URL (a registration's or an upload's ``callback_url``) is refused.

    ``code`` and ``reason`` are the `FetchError`'s that refused it
    (``bad-scheme``, ``blocked-address``, ``dns-error``...); the message
    reads ``callback_url refused: <code>: <reason>``.
    """

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"callback_url refused: {code}: {reason}")


class ManifestError(CsvimgError, ValueError):
    """The uploaded CSV was rejected; ``errors`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.errors = list(problems)
        n = len(self.errors)
        first = self.errors[0].message if self.errors else "invalid CSV"
        super().__init__(
            first if n == 1 else f"{n} problems in the CSV; the first: {first}"
        )


class TransitionError(CsvimgError, RuntimeError):
    """A request or item was asked to make a move its state machine forbids."""


class NotFoundError(CsvimgError, KeyError):
    """A request, item or webhook does not exist (or is not visible)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class NotFinishedError(CsvimgError, RuntimeError):
    """A result was asked of a request that has not finished yet."""


class StorageError(CsvimgError, RuntimeError):
    """A storage, queue or blob backend failed (database down, disk full...)."""


class ItemError(CsvimgError):
    """One image could not be processed.

    ``code`` is stable and machine-readable; ``message`` is for people;
    ``retryable`` says whether another attempt may succeed.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(f"{code}: {message}")


class FetchError(ItemError):
    """Downloading an image failed (blocked address, timeout, HTTP error...)."""


class CodecError(ItemError):
    """Decoding or encoding an image failed (not an image, bomb, corrupt...)."""
