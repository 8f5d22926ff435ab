"""The plugin interface of csvimg: the hook marker, the hook specification, the registry.

A leaf module (pluggy, attrs, the standard library and `csvimg._errors`
only), so that a backend can import what it needs to register itself
without importing the plugin manager (`csvimg.plugins`), which in turn
imports the built-in backends by name. A plugin writes::

    from csvimg.hooks import BackendRegistry, hookimpl   # or: from csvimg import ...

    @hookimpl
    def csvimg_register_backends(registry: BackendRegistry) -> None:
        registry.add_storage("postgresql", PostgresStorage.from_url)

A factory takes the backend URL and the engine `Settings` and returns an
unopened backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import attrs
import pluggy

from csvimg._errors import ConfigError

if TYPE_CHECKING:
    from csvimg.backends import BlobStore, Notifier, Queue, Storage
    from csvimg.settings import Settings

__all__ = [
    "PROJECT",
    "BackendRegistry",
    "Factory",
    "HookSpecs",
    "hookimpl",
    "hookspec",
    "scheme_of",
]

PROJECT = "csvimg"
"""The pluggy project name and the entry-point group of third-party plugins."""

hookspec = pluggy.HookspecMarker(PROJECT)
"""Marks hook specifications (used by `HookSpecs` only)."""

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a plugin's hook implementations."""

T = TypeVar("T")
Factory = Callable[[str, "Settings"], T]
"""A backend factory: ``(url, settings) -> backend``, the backend unopened."""


def scheme_of(url: str) -> str:
    """Return the lower-cased scheme of a backend URL (``sqlite:///x`` -> ``sqlite``)."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        scheme, sep, _ = url.partition(":")
    if not sep or not scheme:
        raise ConfigError(f"backend URL {url!r} has no scheme (e.g. memory://, sqlite:///path)")
    return scheme.lower()


def _as_url(queue: str) -> str:
    """``memory`` -> ``memory://``; a URL stays as it is."""
    return queue if ":" in queue else f"{queue}://"


@attrs.define
class BackendRegistry:
    """Scheme -> factory tables, one per kind of backend, filled by plugins.

    A later registration of a scheme replaces an earlier one.
    ``storage_queues`` maps a storage scheme to the queue URL used when no
    queue URL is configured (see `add_storage`).
    """

    storage: dict[str, Factory[Storage]] = attrs.field(factory=dict)
    queue: dict[str, Factory[Queue]] = attrs.field(factory=dict)
    blobs: dict[str, Factory[BlobStore]] = attrs.field(factory=dict)
    notifier: dict[str, Factory[Notifier]] = attrs.field(factory=dict)
    storage_queues: dict[str, str] = attrs.field(factory=dict)

    def add_storage(
        self, scheme: str, factory: Factory[Storage], *, queue: str | None = None
    ) -> None:
        """Serve storage URLs of *scheme* with *factory*.

        *queue* is the queue to use with this storage when no queue URL is
        configured: a queue URL, or a bare scheme such as ``"memory"``
        (``memory://``, the process-local queue of in-process workers).
        Without it, the queue URL defaults to the storage URL, which then
        needs a queue backend of the same scheme.
        """
        key = scheme.lower()
        self.storage[key] = factory
        if queue is None:
            self.storage_queues.pop(key, None)
        else:
            self.storage_queues[key] = _as_url(queue)

    def add_queue(self, scheme: str, factory: Factory[Queue]) -> None:
        """Serve queue URLs of *scheme* with *factory*."""
        self.queue[scheme.lower()] = factory

    def add_blobs(self, scheme: str, factory: Factory[BlobStore]) -> None:
        """Serve blob-store URLs of *scheme* with *factory*."""
        self.blobs[scheme.lower()] = factory

    def add_notifier(self, scheme: str, factory: Factory[Notifier]) -> None:
        """Serve notifier URLs of *scheme* (e.g. ``webhook``) with *factory*."""
        self.notifier[scheme.lower()] = factory

    def default_queue_url(self, storage_url: str) -> str:
        """The queue URL that goes with *storage_url* when none is configured.

        The queue its storage registration named (``add_storage(...,
        queue=...)``), else the storage URL itself.
        """
        return self.storage_queues.get(scheme_of(storage_url), storage_url)


class HookSpecs:
    """Hook specifications of csvimg."""

    @hookspec(historic=True)
    def csvimg_register_backends(self, registry: BackendRegistry) -> None:
        """Register the storage, queue, blob-store and notifier backends a plugin serves.

        Called once per plugin with the manager's `BackendRegistry` (a
        historic hook: a plugin registered later is called when it is
        registered); call its ``add_*`` methods. Plugins are called in
        registration order (built-ins, entry points, ``extra``, later
        ``register`` calls) and a later registration of a scheme wins, so a
        plugin may replace a built-in backend.
        """
