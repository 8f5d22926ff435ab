"""`StorageContract`: the executable contract of a `Storage`.

The tests live in one module per part of the contract (requests, leases,
finishing, batches, outbox); `StorageContract` gathers them, adds the
Hypothesis state machine, and is the one class a backend subclasses.
"""

from __future__ import annotations

from typing import ClassVar

import anyio
import anyio.to_thread
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from csvimg.backends import Storage
from csvimg.testing._storage_batches import _BatchTests
from csvimg.testing._storage_finishing import _FinishTests
from csvimg.testing._storage_leases import _LeaseTests
from csvimg.testing._storage_outbox import _OutboxTests
from csvimg.testing._storage_requests import _RequestTests
from csvimg.testing.state_machine import StorageMachine

__all__ = ["StorageContract"]


# Bases in reverse: pytest (and the API docs) list inherited tests from the
# last base to the first, so this runs the parts in the order of the contract.
class StorageContract(_OutboxTests, _BatchTests, _FinishTests, _LeaseTests, _RequestTests):
    """The `Storage` contract; a subclass provides the ``storage`` fixture.

    The fixture yields a fresh, empty, opened backend for each test.
    Timing knobs (`short_lease`, `concurrent_finishers`) and the `create`
    helper are inherited from the parts.
    """

    state_machine_settings: ClassVar[settings] = settings(
        max_examples=50,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    """Hypothesis settings of `test_state_machine`."""

    async def test_state_machine(self, storage: Storage) -> None:
        """Random start/extend/retry/finish sequences keep every invariant."""
        machine = type("Machine", (StorageMachine,), {"storage": storage})
        config = self.state_machine_settings
        await anyio.to_thread.run_sync(
            lambda: run_state_machine_as_test(machine, settings=config)
        )
