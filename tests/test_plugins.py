"""Plugins: schemes, entry points, blocking, unknown schemes."""

from __future__ import annotations

import pytest

import csvimg
from csvimg import ConfigError, Settings, UnknownSchemeError
from csvimg.backends.memory import MemoryStorage
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
