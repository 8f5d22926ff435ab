"""Every built-in backend runs the contract suite of `csvimg.testing`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csvimg import Settings
from csvimg.backends import BlobStore, Queue, Storage
from csvimg.backends.files import FileBlobStore
from csvimg.backends.memory import MemoryBlobStore, MemoryQueue, MemoryStorage
from csvimg.backends.sqlite import SqliteQueue, SqliteStorage
from csvimg.testing import (
    BlobStoreContract,
    EngineSmokeTests,
    QueueContract,
    StorageContract,
)


class TestMemoryStorage(StorageContract):
    keeps_data = False  # memory:// keeps nothing once the object is gone

    @pytest.fixture
    async def storage(self) -> AsyncIterator[Storage]:
        backend = MemoryStorage()
        await backend.open()
        yield backend
        await backend.close()


class TestMemoryQueue(QueueContract):
    @pytest.fixture
    async def queue(self) -> AsyncIterator[Queue]:
        backend = MemoryQueue()
        await backend.open()
        yield backend
        await backend.close()


class TestMemoryBlobStore(BlobStoreContract):
    @pytest.fixture
    async def blobs(self) -> AsyncIterator[BlobStore]:
        backend = MemoryBlobStore()
        await backend.open()
        yield backend
        await backend.close()


class TestMemoryEngine(EngineSmokeTests):
    @pytest.fixture
    def engine_settings(self) -> Settings:
        return Settings(storage_url="memory://", blobs_url="memory://")


class TestSqliteStorage(StorageContract):
    async def reopened(self, storage: Storage) -> Storage:
        assert isinstance(storage, SqliteStorage)
        other = SqliteStorage(storage.path)
        await other.open()
        return other

    @pytest.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[Storage]:
        backend = SqliteStorage(tmp_path / "csvimg.db")
        await backend.open()
        yield backend
        await backend.close()


class TestSqliteQueue(QueueContract):
    @pytest.fixture
    async def queue(self, tmp_path: Path) -> AsyncIterator[Queue]:
        backend = SqliteQueue(tmp_path / "csvimg.db")
        await backend.open()
        yield backend
        await backend.close()


class TestFileBlobStore(BlobStoreContract):
    @pytest.fixture
    async def blobs(self, tmp_path: Path) -> AsyncIterator[BlobStore]:
        backend = FileBlobStore(tmp_path / "blobs")
        await backend.open()
        yield backend
        await backend.close()


class TestSqliteEngine(EngineSmokeTests):
    @pytest.fixture
    def engine_settings(self, tmp_path: Path) -> Settings:
        return Settings(
            storage_url=f"sqlite:///{tmp_path}/csvimg.db", blobs_url=f"file://{tmp_path}/blobs"
        )
