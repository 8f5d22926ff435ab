"""The contract test suite every backend runs, built-in or third-party.

`csvimg.backends` states the contract of each kind of backend in words;
this module is the executable version. It ships in the wheel so that a
package providing, say, a PostgreSQL storage proves the same behaviour as
``memory://`` and ``sqlite://`` by subclassing a base class here and
providing one fixture (the fsspec ``tests/abstract`` style)::

    import pytest
    from csvimg.testing import StorageContract

    class TestPostgresStorage(StorageContract):
        @pytest.fixture
        async def storage(self, postgresql_url):
            backend = PostgresStorage.from_url(postgresql_url, Settings())
            await backend.open()
            yield backend          # a fresh, empty, opened backend per test
            await backend.close()

The base classes and the fixture each one needs:

* `StorageContract`  -- ``storage``: an opened `Storage`
* `QueueContract`    -- ``queue``:   an opened `Queue`
* `BlobStoreContract` -- ``blobs``:  an opened `BlobStore`
* `EngineSmokeTests` -- ``engine_settings``: `Settings` naming fresh,
  empty backends (a whole request through an `Engine` on them)

Tests are ``async def`` methods run by AnyIO's pytest plugin, which comes
with anyio and needs no configuration: the base classes carry the
``anyio`` mark and an ``anyio_backend`` fixture answering ``"asyncio"``
(override it, e.g. with ``params=["asyncio", "trio"]``, to run on more
loops). So the backend fixture may be an async generator, as above. The
suite needs ``pytest`` and ``hypothesis`` installed; only test suites
import this module.

To see values in failed asserts, have pytest rewrite this module too: in
the suite's ``conftest.py``, before anything imports it::

    pytest.register_assert_rewrite("csvimg.testing")

What is proven:

* storage -- round trips of requests, rows and items with pagination;
  `create_request` all or nothing; newest-first listing per owner;
  `start_item` / `extend_lease` / `retry_item` moves and refusals, lease
  takeover; `finish_item` results, counters, idempotence, the COMPLETED /
  FAILED rule, exactly one winner and one event under concurrent
  finishers; the batch methods (`start_items`, `extend_leases`,
  `finish_items`) with known, unknown, finished and repeated ids, batches
  finishing some requests and not others, and exactly one winner and one
  event under concurrent batches; `stale_items`; webhooks; the outbox (due, leased,
  rescheduled, delivered); delivery logs; and a Hypothesis state machine
  (`StorageMachine`) checking the invariants after random sequences.
* queue -- claim / ack, *max_items*, waiting and waking, lease expiry and
  redelivery with counted deliveries, release with delay, extend, `ack_many`
  and `extend_many` (stale claims ignored), depth,
  at-least-once with concurrent consumers that die mid-item.
* blob store -- put / get / stat / delete, content types, etags that
  follow the bytes, overwrite, nested keys, atomic replacement under
  concurrent readers, and refusal of every key in `HOSTILE_KEYS` with
  `ValueError` (see `csvimg.backends.files.check_key` for the rule).
* engine -- a small CSV whose images a local HTTP server serves runs to
  COMPLETED through an `Engine` on the backends, with the right counts,
  stored images and output CSV.

Timing knobs are class attributes (`QueueContract.lease`,
`StorageContract.short_lease`...): a backend whose clock is remote may
raise them. `StorageContract.state_machine_settings` sizes the Hypothesis
state machine.

Some tests read events by claiming them with `claimable_events`, which
leases them until `FAR_FUTURE`: the backend under test must not be
shared with anything else.

The suite is a package with one module per contract (``storage``,
``queue``, ``blobs``, ``engine``, and ``state_machine`` for
`StorageMachine`); import every name from ``csvimg.testing`` itself.
"""

from __future__ import annotations

from csvimg.testing._helpers import (
    FAR_FUTURE,
    claim_events,
    claimable_events,
    extend_lease,
    extend_leases,
    finish_item,
    finish_items,
    reschedule_event,
    sample_request,
    stale_items,
    start_item,
    start_items,
)
from csvimg.testing.blobs import HOSTILE_KEYS, BlobStoreContract
from csvimg.testing.engine import EngineBackends, EngineSmokeTests
from csvimg.testing.queue import QueueContract
from csvimg.testing.state_machine import StorageMachine
from csvimg.testing.storage import StorageContract

__all__ = [
    "FAR_FUTURE",
    "HOSTILE_KEYS",
    "BlobStoreContract",
    "EngineBackends",
    "EngineSmokeTests",
    "QueueContract",
    "StorageContract",
    "StorageMachine",
    "claim_events",
    "claimable_events",
    "extend_lease",
    "extend_leases",
    "finish_item",
    "finish_items",
    "reschedule_event",
    "sample_request",
    "stale_items",
    "start_item",
    "start_items",
]
