"""Data written by the previous release keeps working (the storage format did not change).

``tests/data/release-0.1.0.sqlite`` was written by csvimg 0.1.0 as released
(commit a4c2f4c, before the ledger redesign): one request half done (item 0
DONE, item 1 leased, items 2 and 3 PENDING), one request FAILED with its
undelivered outbox event, one webhook. Today's code opens it, finishes the
work and delivers from its outbox with no migration.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from csvimg import ItemStatus, RequestStatus
from csvimg.backends.sqlite import SqliteStorage
from csvimg.jobs import ItemResult
from csvimg.testing import FAR_FUTURE, claim_events, finish_items, start_items

DATA = Path(__file__).parent / "data" / "release-0.1.0.sqlite"
HALF = "0b5e1a9e-7c53-4b8e-9f0e-000000000001"
FAILED = "0b5e1a9e-7c53-4b8e-9f0e-000000000002"


@pytest.mark.anyio
async def test_a_sqlite_file_of_the_previous_release_opens_and_runs(tmp_path: Path) -> None:
    path = tmp_path / "csvimg.db"
    shutil.copy(DATA, path)
    storage = SqliteStorage(path)
    await storage.open()
    try:
        half = await storage.get_request(HALF)
        assert half is not None
        assert (half.status, half.total, half.done) == (RequestStatus.PROCESSING, 4, 1)
        items = await storage.list_items(HALF)
        assert [i.status for i in items] == [
            ItemStatus.DONE, ItemStatus.PROCESSING, ItemStatus.PENDING, ItemStatus.PENDING
        ]
        assert items[0].output_key == "x/0.jpg"
        [hook] = await storage.list_webhooks()
        assert hook.url == "https://hooks.example/x"

        # The old release's outbox event is leased and delivered like a new one.
        [old_event] = await claim_events(storage, now=FAR_FUTURE, limit=10, lease_seconds=0)
        assert (old_event.request_id, old_event.type) == (FAILED, "request.failed")

        # The leased item's result arrives; the PENDING ones start and finish.
        started = await start_items(storage, [items[2].id, items[3].id], lease_seconds=30)
        assert [i.attempts for i in started] == [1, 1]
        ok = ItemResult(output_key="x/n.jpg", content_type="image/jpeg", bytes_in=9,
                        bytes_out=4, width=1, height=1)
        finished = await finish_items(storage, [(i.id, ok) for i in items[1:]])
        assert [r.id for r in finished] == [HALF]
        done = await storage.get_request(HALF)
        assert done is not None
        assert (done.status, done.done, done.failed) == (RequestStatus.COMPLETED, 4, 0)
        events = await claim_events(storage, now=FAR_FUTURE, limit=10, lease_seconds=0)
        assert sorted(e.request_id for e in events) == sorted([FAILED, HALF])
    finally:
        await storage.close()
