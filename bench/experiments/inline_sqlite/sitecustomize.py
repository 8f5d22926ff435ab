"""Experiment, not product code: every SQLite call runs inline on the event loop.

``python -m bench --env PYTHONPATH=bench/experiments/inline_sqlite`` loads this
into the product processes: `_Database.run` calls the statement directly
instead of hopping to a worker thread (anyio.to_thread), to measure what the
thread hops cost per image.
"""

import csvimg.backends.sqlite as _sqlite


async def _run(self, fn):  # type: ignore[no-untyped-def]
    return self.call(fn)


_sqlite._Database.run = _run
