"""csvimg's contract suite, run on the PostgreSQL backends: this is all it takes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from csvimg import Settings, Storage
from csvimg.testing import EngineSmokeTests, QueueContract, StorageContract

from csvimg_postgres import PostgresQueue, PostgresStorage


class TestPostgresStorage(StorageContract):
    async def reopened(self, storage: Storage) -> Storage:
        assert isinstance(storage, PostgresStorage)
        other = PostgresStorage(storage.url)
        await other.open()
        return other

    @pytest.fixture
    async def storage(self, schema_url: str) -> AsyncIterator[PostgresStorage]:
        backend = PostgresStorage(schema_url)
        await backend.open()
        yield backend
        await backend.close()


class TestPostgresQueue(QueueContract):
    @pytest.fixture
    async def queue(self, schema_url: str) -> AsyncIterator[PostgresQueue]:
        backend = PostgresQueue(schema_url)
        await backend.open()
        yield backend
        await backend.close()


class TestPostgresEngine(EngineSmokeTests):
    @pytest.fixture
    def engine_settings(self, schema_url: str) -> Settings:
        # The queue URL defaults to the storage's: PostgresQueue.
        return Settings(storage_url=schema_url, blobs_url="memory://")
