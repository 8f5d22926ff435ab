"""The app's lifespan: open the engine and run the in-process worker loops.

`Lifespan` is the Starlette lifespan of `csvimg_server.app.create_app`:
``workers`` worker loops plus one outbox (webhook delivery) loop in a task
group; shutdown lets in-flight images finish for a moment and then cancels
(leases hand the rest to the next worker).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
import attrs
from starlette.applications import Starlette

from csvimg.engine import Engine

__all__ = ["SHUTDOWN_GRACE", "Lifespan"]

log = logging.getLogger("csvimg.server")

SHUTDOWN_GRACE: Final = 10.0
"""Seconds in-flight items get to finish when the server stops."""


@attrs.define
class Lifespan:
    """Opens the engine and runs the in-process workers for the app's lifetime.

    An attrs class whose instance is the Starlette lifespan (as in
    ``svcs.starlette``): ``workers`` worker loops (the first also sweeps for
    lost items) and, when there is at least one, a single outbox loop.
    An engine handed in by the caller is opened but not closed.
    """

    engine: Engine
    workers: int = 1
    owns_engine: bool = True
    shutdown_grace: float = SHUTDOWN_GRACE

    async def _supervise(self, index: int, stop: anyio.Event) -> None:
        # A bug in one loop must not take the API down with it: log and
        # start the loop again after a pause.
        while not stop.is_set():
            try:
                await self.engine.run_worker(stop=stop, sweep=index == 0, deliver=False)
            except Exception:
                log.exception("worker loop %d crashed; restarting in 1 s", index)
                await anyio.sleep(1.0)

    async def _outbox(self) -> None:
        while True:
            try:
                await self.engine.run_outbox()
                return
            except Exception:
                log.exception("outbox loop crashed; restarting in 1 s")
                await anyio.sleep(1.0)

    async def _workers(self, stop: anyio.Event, done: anyio.Event) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for index in range(self.workers):
                    tg.start_soon(self._supervise, index, stop)
        finally:
            done.set()

    @contextlib.asynccontextmanager
    async def __call__(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        """Open the engine, start the loops, and stop them on shutdown."""
        engine = self.engine
        await engine.open()
        try:
            async with anyio.create_task_group() as tg:
                stop = anyio.Event()
                done = anyio.Event()
                if self.workers > 0:
                    tg.start_soon(self._workers, stop, done)
                    tg.start_soon(self._outbox)
                    log.info("started %d in-process worker loop(s)", self.workers)
                else:
                    done.set()
                yield {"engine": engine}
                # No new items are claimed from here; the ones in flight get
                # a moment to finish, then are cancelled and their leases
                # hand them to the next worker.
                stop.set()
                with anyio.move_on_after(self.shutdown_grace):
                    await done.wait()
                tg.cancel_scope.cancel()
        finally:
            if self.owns_engine:
                with anyio.CancelScope(shield=True):
                    await engine.close()
