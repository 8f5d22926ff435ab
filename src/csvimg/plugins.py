"""Plugins: the pluggy manager that finds backends by URL scheme.

The interface a plugin implements (`hookimpl`, the hook specification,
`BackendRegistry`) lives in the leaf module `csvimg.hooks` and is
re-exported here. This module is the manager: it imports the built-in
plugins by module name (`BUILTIN_PLUGINS`) when a `Plugins` is built, then
every entry point in the group ``csvimg``, except those named in
``CSVIMG_DISABLED_PLUGINS`` (a comma-separated list of entry-point names;
``*`` disables them all), then the ``extra`` plugins given in code.

The hook is historic: each plugin is called as it is registered, in that
order, and a later registration of a scheme wins, so a third-party plugin
replaces a built-in backend of the same scheme.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Final, TypeVar

import pluggy

from csvimg._errors import PluginError, UnknownSchemeError
from csvimg.hooks import PROJECT, BackendRegistry, Factory, HookSpecs, hookimpl, hookspec, scheme_of

if TYPE_CHECKING:
    from csvimg.backends import BlobStore, Notifier, Queue, Storage
    from csvimg.settings import Settings

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_ENV",
    "OPTIONAL_PLUGINS",
    "PROJECT",
    "BackendRegistry",
    "HookSpecs",
    "Plugins",
    "hookimpl",
    "hookspec",
    "scheme_of",
]

DISABLE_ENV: Final = "CSVIMG_DISABLED_PLUGINS"
"""Comma-separated entry-point names of third-party plugins not to load (``*``: none)."""

BUILTIN_PLUGINS: Final = (
    "csvimg.backends.memory",
    "csvimg.backends.sqlite",
    "csvimg.backends.files",
    "csvimg.webhooks",
    "csvimg.backends.redis",
    "csvimg.backends.celery",
)
"""The built-in plugins, by module name, registered in this order by every `Plugins`."""

OPTIONAL_PLUGINS: Final = frozenset({"csvimg.backends.redis", "csvimg.backends.celery"})
"""Built-in plugins skipped when their client library (an extra) is not installed."""

T = TypeVar("T")


def _builtin_plugins() -> list[object]:
    plugins: list[object] = []
    for name in BUILTIN_PLUGINS:
        try:
            plugins.append(importlib.import_module(name))
        except ImportError:  # pragma: no cover - the extra (redis, celery) is not installed
            if name not in OPTIONAL_PLUGINS:
                raise
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
        self.manager.add_hookspecs(HookSpecs)
        self.registry = BackendRegistry()
        for plugin in _builtin_plugins():
            self.manager.register(plugin)
        # From here on every plugin is called as it is registered, after the
        # ones before it: later registrations of a scheme win.
        self.manager.hook.csvimg_register_backends.call_historic(kwargs={"registry": self.registry})
        if load_entrypoints:
            disabled = {n.strip() for n in env.get(DISABLE_ENV, "").split(",") if n.strip()}
            if "*" not in disabled:
                for name in disabled:
                    self.manager.set_blocked(name)
                self._load_entrypoints()
        for plugin in extra:
            self.manager.register(plugin)
        self.manager.check_pending()

    def _load_entrypoints(self) -> None:
        """Register every entry point of the group ``csvimg`` not blocked or already there."""
        for ep in entry_points(group=PROJECT):
            if self.manager.get_plugin(ep.name) is not None or self.manager.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(ep.name, ep.value, exc) from exc
            self.manager.register(plugin, name=ep.name)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register one more plugin and let it add its backends (they win over earlier ones)."""
        self.manager.register(plugin, name=name)
        self.manager.check_pending()

    def queue_url(self, settings: Settings) -> str:
        """The queue URL for *settings*: ``queue_url``, else the storage's default queue.

        The default is the queue the storage's registration named
        (``add_storage(..., queue=...)``), else the storage URL itself. The
        engine and the command line both ask this.
        """
        return settings.queue_url or self.registry.default_queue_url(settings.storage_url)

    def _build(self, kind: str, table: Mapping[str, Factory[T]], url: str, settings: Settings) -> T:
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
