"""Experiment, not product code: one lock for this process's SQLite writers.

``python -m bench --env PYTHONPATH=bench/experiments/sqlite_write_lock``: writer
threads queue on a `threading.Lock` before ``BEGIN IMMEDIATE`` instead of
colliding in SQLite's busy handler (which sleeps 1, 2, 5, 10 ... ms).
"""

import threading

# Patched where `_Database.write` looks it up, not in the package that re-exports it.
import csvimg.backends.sqlite._database as _sqlite

_lock = threading.Lock()
_original = _sqlite._in_transaction


def _in_transaction(conn, fn):  # type: ignore[no-untyped-def]
    with _lock:
        return _original(conn, fn)


_sqlite._in_transaction = _in_transaction
