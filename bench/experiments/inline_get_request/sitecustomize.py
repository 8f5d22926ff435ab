"""Experiment, not product code: ``SqliteStorage.get_request`` reads on the event loop.

``python -m bench --only status --env PYTHONPATH=bench/experiments/inline_get_request``:
the primary-key read of the status API runs inline (in WAL mode a reader never
waits for the writer) instead of in a worker thread.
"""

import csvimg.backends.sqlite as _sqlite


async def _get_request(self, request_id):  # type: ignore[no-untyped-def]
    return self._db.call(lambda conn: _sqlite._get_request(conn, request_id))


_sqlite.SqliteStorage.get_request = _get_request
