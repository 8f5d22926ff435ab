"""Plugins: how backends are found, by URL scheme, through pluggy.

A plugin is a module or object with functions marked `hookimpl`. Built-in
backends are registered first; then every entry point in the group
``csvimg`` is loaded, except those named in ``CSVIMG_DISABLED_PLUGINS``
(a comma-separated list of entry-point names; ``*`` disables them all).

A plugin announces its backends through `csvimg_register_backends`, which
receives a typed `BackendRegistry` rather than returning loose values::

    from csvimg.plugins import hookimpl

    @hookimpl
    def csvimg_register_backends(registry):
        registry.add_storage("postgresql", PostgresStorage.from_url)

A factory takes the backend URL and the engine `Settings` and returns an
unopened backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy

from csvimg._errors import ConfigError, UnknownSchemeError

if TYPE_CHECKING:
    from csvimg.backends import BlobStore, Notifier, Queue, Storage
    from csvimg.settings import Settings

__all__ = [
    "PROJECT",
    "BackendRegistry",
    "Plugins",
    "hookimpl",
    "hookspec",
    "scheme_of",
]

PROJECT = "csvimg"
"""The pluggy project name and the entry-point group of third-party plugins."""

DISABLE_ENV = "CSVIMG_DISABLED_PLUGINS"

hookspec = pluggy.HookspecMarker(PROJECT)
"""Marks hook specifications (used by `csvimg.plugins` only)."""

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a plugin's hook implementations."""

T = TypeVar("T")
Factory = Callable[[str, "Settings"], T]


def scheme_of(url: str) -> str:
    """Return the lower-cased scheme of a backend URL (``sqlite:///x`` -> ``sqlite``)."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        scheme, sep, _ = url.partition(":")
    if not sep or not scheme:
        raise ConfigError(f"backend URL {url!r} has no scheme (e.g. memory://, sqlite:///path)")
    return scheme.lower()


@attrs.define
class BackendRegistry:
    """Scheme -> factory tables, one per kind of backend, filled by plugins."""

    storage: dict[str, Factory[Storage]] = attrs.field(factory=dict)
    queue: dict[str, Factory[Queue]] = attrs.field(factory=dict)
    blobs: dict[str, Factory[BlobStore]] = attrs.field(factory=dict)
    notifier: dict[str, Factory[Notifier]] = attrs.field(factory=dict)

    def add_storage(self, scheme: str, factory: Factory[Storage]) -> None:
        """Serve storage URLs of *scheme* with *factory*."""
        self.storage[scheme.lower()] = factory

    def add_queue(self, scheme: str, factory: Factory[Queue]) -> None:
        """Serve queue URLs of *scheme* with *factory*."""
        self.queue[scheme.lower()] = factory

    def add_blobs(self, scheme: str, factory: Factory[BlobStore]) -> None:
        """Serve blob-store URLs of *scheme* with *factory*."""
        self.blobs[scheme.lower()] = factory

    def add_notifier(self, scheme: str, factory: Factory[Notifier]) -> None:
        """Serve notifier URLs of *scheme* (e.g. ``webhook``) with *factory*."""
        self.notifier[scheme.lower()] = factory


class _Spec:
    """Hook specifications of csvimg."""

    @hookspec
    def csvimg_register_backends(self, registry: BackendRegistry) -> None:
        """Register the storage, queue, blob-store and notifier backends a plugin serves.

        Called once per plugin manager with a `BackendRegistry`; call its
        ``add_*`` methods. Later registrations of a scheme win, so a plugin
        may replace a built-in backend.
        """


def _builtin_plugins() -> list[object]:
    from csvimg.backends import files, memory, sqlite

    plugins: list[object] = [memory, sqlite, files]
    from csvimg import webhooks

    plugins.append(webhooks)
    # Optional engines: registered only when their client library is installed.
    try:
        from csvimg.backends import redis as redis_backend
    except ImportError:  # pragma: no cover - the redis extra is not installed
        pass
    else:
        plugins.append(redis_backend)
    try:
        from csvimg.backends import celery as celery_backend  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # pragma: no cover - the celery extra is not installed
        pass
    else:
        plugins.append(celery_backend)
    return plugins


class Plugins:
    """A pluggy manager for one engine, with one typed method per hook.

    Built fresh for each engine so tests and embedding applications never
    share global plugin state.
    """

    def __init__(
        self,
        *,
        load_entrypoints: bool = True,
        extra: Iterable[object] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(_Spec)
        for plugin in _builtin_plugins():
            self.manager.register(plugin)
        if load_entrypoints:
            disabled = {n.strip() for n in env.get(DISABLE_ENV, "").split(",") if n.strip()}
            if "*" not in disabled:
                for name in disabled:
                    self.manager.set_blocked(name)
                self.manager.load_setuptools_entrypoints(PROJECT)
        for plugin in extra:
            self.manager.register(plugin)
        self.manager.check_pending()
        self.registry = BackendRegistry()
        self.manager.hook.csvimg_register_backends(registry=self.registry)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register one more plugin and let it add its backends."""
        self.manager.register(plugin, name=name)
        self.manager.check_pending()
        impl: Any = getattr(plugin, "csvimg_register_backends", None)
        if impl is not None:
            impl(registry=self.registry)

    def _build(self, kind: str, table: Mapping[str, Factory[T]], url: str,
               settings: Settings) -> T:
        factory = table.get(scheme_of(url))
        if factory is None:
            raise UnknownSchemeError(kind, url, list(table))
        return factory(url, settings)

    def storage(self, url: str, settings: Settings) -> Storage:
        """Build the storage backend for *url*."""
        return self._build("storage", self.registry.storage, url, settings)

    def queue(self, url: str, settings: Settings) -> Queue:
        """Build the queue backend for *url*."""
        return self._build("queue", self.registry.queue, url, settings)

    def blobs(self, url: str, settings: Settings) -> BlobStore:
        """Build the blob store for *url*."""
        return self._build("blob store", self.registry.blobs, url, settings)

    def notifier(self, url: str, settings: Settings) -> Notifier:
        """Build the notifier for *url*."""
        return self._build("notifier", self.registry.notifier, url, settings)
