"""Plugins: schemes, entry points, blocking, unknown schemes."""

from __future__ import annotations

import importlib.metadata

import pytest

import csvimg
from csvimg import ConfigError, CsvimgError, PluginError, Settings, UnknownSchemeError
from csvimg import plugins as plugins_module
from csvimg.backends.memory import MemoryQueue, MemoryStorage
from csvimg.backends.sqlite import SqliteStorage
from csvimg.plugins import BackendRegistry, Plugins, hookimpl, scheme_of


def test_builtin_schemes() -> None:
    p = Plugins(load_entrypoints=False)
    assert {"memory", "sqlite"} <= set(p.registry.storage)
    assert {"memory", "sqlite"} <= set(p.registry.queue)
    assert {"memory", "file"} <= set(p.registry.blobs)
    assert "webhook" in p.registry.notifier
    assert isinstance(p.storage("memory://", Settings()), MemoryStorage)


def test_unknown_scheme_lists_known_ones() -> None:
    p = Plugins(load_entrypoints=False)
    with pytest.raises(UnknownSchemeError) as info:
        p.storage("mongodb://x", Settings())
    assert "mongodb" in str(info.value)
    assert "memory" in str(info.value) and "sqlite" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("url", ["", "nothing", "://x"])
def test_url_without_scheme(url: str) -> None:
    with pytest.raises(ConfigError):
        scheme_of(url)


class _ThirdParty:
    """A plugin as a third party would write it."""

    @hookimpl
    def csvimg_register_backends(self, registry: BackendRegistry) -> None:
        registry.add_storage("custom", lambda url, settings: MemoryStorage())


def test_extra_plugin_adds_a_scheme() -> None:
    p = Plugins(load_entrypoints=False, extra=[_ThirdParty()])
    assert isinstance(p.storage("custom://anything", Settings()), MemoryStorage)


def test_register_later() -> None:
    p = Plugins(load_entrypoints=False)
    p.register(_ThirdParty(), name="late")
    assert "custom" in p.registry.storage


class _OwnSqlite:
    """A third-party plugin replacing the built-in ``sqlite`` storage."""

    @hookimpl
    def csvimg_register_backends(self, registry: BackendRegistry) -> None:
        registry.add_storage("sqlite", lambda url, settings: MemoryStorage())


def test_third_party_plugin_overrides_a_builtin_scheme() -> None:
    p = Plugins(load_entrypoints=False, extra=[_OwnSqlite()])
    assert isinstance(p.storage("sqlite:///x.db", Settings()), MemoryStorage)
    # the built-in sqlite queue is untouched
    assert "sqlite" in p.registry.queue


def test_late_registration_is_replayed_and_wins() -> None:
    # The hook is historic: pluggy calls a plugin registered after the
    # manager was built, and its registrations win over the built-ins.
    p = Plugins(load_entrypoints=False)
    assert p.manager.hook.csvimg_register_backends.is_historic()
    assert type(p.storage("sqlite:///x.db", Settings())) is SqliteStorage
    p.register(_OwnSqlite(), name="own-sqlite")
    assert isinstance(p.storage("sqlite:///x.db", Settings()), MemoryStorage)


class _KeyValue:
    """A storage-only plugin: its storage runs with the in-process memory queue."""

    @hookimpl
    def csvimg_register_backends(self, registry: BackendRegistry) -> None:
        registry.add_storage("kv", lambda url, settings: MemoryStorage(), queue="memory")


def test_storage_only_plugin_names_its_default_queue() -> None:
    p = Plugins(load_entrypoints=False, extra=[_KeyValue()])
    assert p.queue_url(Settings(storage_url="kv://x")) == "memory://"
    # an explicit queue URL still wins; other storages keep their own URL
    assert p.queue_url(Settings(storage_url="kv://x", queue_url="sqlite:///q.db")) == (
        "sqlite:///q.db")
    assert p.queue_url(Settings(storage_url="sqlite:///s.db")) == "sqlite:///s.db"
    engine = csvimg.Engine(Settings(storage_url="kv://x"), plugins=p)
    assert isinstance(engine.queue, MemoryQueue)


class _BrokenEntryPoint:
    """An installed plugin whose own dependency is missing."""

    name = "broken"
    value = "csvimg_broken_plugin"
    group = "csvimg"

    def load(self) -> object:
        raise ModuleNotFoundError("No module named 'missing_dependency'",
                                  name="missing_dependency")


@pytest.fixture
def broken_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points

    def entry_points(**params: str) -> object:
        if params.get("group") == "csvimg":
            return [_BrokenEntryPoint(), *real(**params)]
        return real(**params)

    monkeypatch.setattr(plugins_module, "entry_points", entry_points)


@pytest.mark.usefixtures("broken_entry_point")
def test_entry_point_that_fails_to_import_is_a_plugin_error() -> None:
    with pytest.raises(PluginError) as info:
        csvimg.Engine(Settings())
    message = str(info.value)
    assert "'broken'" in message and "csvimg_broken_plugin" in message
    assert "No module named 'missing_dependency'" in message
    assert "CSVIMG_DISABLED_PLUGINS=broken" in message
    assert info.value.plugin == "broken"
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert isinstance(info.value, CsvimgError)


@pytest.mark.usefixtures("broken_entry_point")
def test_disabling_a_broken_plugin_makes_the_engine_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSVIMG_DISABLED_PLUGINS", "some-other, broken")
    engine = csvimg.Engine(Settings())
    assert isinstance(engine.storage, MemoryStorage)
    assert engine.plugins.manager.is_blocked("broken")


def test_entry_points_are_blockable(monkeypatch: pytest.MonkeyPatch) -> None:
    # "*" disables every third-party plugin; built-ins stay.
    p = Plugins(environ={"CSVIMG_DISABLED_PLUGINS": "*"})
    assert "memory" in p.registry.storage
    p2 = Plugins(environ={"CSVIMG_DISABLED_PLUGINS": "some-plugin"})
    assert p2.manager.is_blocked("some-plugin")


def test_engine_per_instance_plugins() -> None:
    e1 = csvimg.Engine(Settings())
    e2 = csvimg.Engine(Settings())
    assert e1.plugins.manager is not e2.plugins.manager
    assert e1.storage is not e2.storage


def test_public_api_all() -> None:
    for name in csvimg.__all__:
        assert hasattr(csvimg, name), name
        obj = getattr(csvimg, name)
        if callable(obj) and not name.isupper():
            assert obj.__doc__, f"{name} has no docstring"
    public = {n for n in dir(csvimg) if not n.startswith("_")}
    # every public module attribute that is a class or function is exported
    import types

    exported = set(csvimg.__all__)
    for n in public:
        obj = getattr(csvimg, n)
        if isinstance(obj, types.ModuleType) or n == "annotations":
            continue
        assert n in exported, f"{n} is public but not in __all__"
