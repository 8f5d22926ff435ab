"""The storage backend of the docs' walk-through (examples/shelf_storage.py) passes the contract."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csvimg import Engine, Plugins, Settings
from csvimg.backends import Storage
from csvimg.testing import EngineBackends, EngineSmokeTests, StorageContract

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import shelf_storage
from shelf_storage import ShelfStorage


# --8<-- [start:contract]
class TestShelfStorage(StorageContract):
    async def reopened(self, storage: Storage) -> Storage:
        assert isinstance(storage, ShelfStorage)
        other = ShelfStorage(storage.path)
        await other.open()
        return other

    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[Storage]:
        backend = ShelfStorage(tmp_path / "state")
        await backend.open()
        yield backend
        await backend.close()
# --8<-- [end:contract]


def test_the_walk_through_counts_the_contract_truly() -> None:
    """docs/plugins.md says how many methods a storage has; the example has exactly those."""
    from csvimg.backends import Storage as Protocol

    methods = sorted(n for n, v in vars(Protocol).items() if not n.startswith("_") and callable(v))
    own = sorted(n for n, v in vars(ShelfStorage).items() if not n.startswith("_") and callable(v))
    assert own == methods
    text = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    assert f"**{len(methods)} methods**" in text


def test_plugin_serves_shelf_urls(tmp_path: Path) -> None:
    """Registered through the hook, ``shelf://`` builds the example's storage."""
    settings = Settings(storage_url=f"shelf://{tmp_path}/state")
    engine = Engine(settings, plugins=Plugins(extra=[shelf_storage]))
    assert isinstance(engine.storage, ShelfStorage)
    assert type(engine.queue).__name__ == "MemoryQueue"  # the queue its hook named


class TestShelfEngine(EngineSmokeTests):
    @pytest.fixture
    def engine_settings(self) -> Settings:
        return Settings(storage_url="memory://", blobs_url="memory://")

    @pytest.fixture
    def engine_backends(self, tmp_path: Path) -> EngineBackends:
        return {"storage": ShelfStorage(tmp_path / "state")}
