"""The worker side of the Celery queue: `make_app`, the task, the per-process engine.

What ``celery -A csvimg.backends.celery worker`` runs. `make_app` builds
the app (the configuration of `csvimg.backends.celery.queue` plus the
``csvimg.process_item`` task) and connects the handlers of Celery's worker
signals that open and close each pool process's engine (`_WorkerRuntime`).
Importing this module does nothing else: no I/O, no signal connected.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Final

from anyio.from_thread import BlockingPortal, start_blocking_portal
from celery import Celery, signals

from csvimg._errors import ConfigError, StorageError
from csvimg.backends.celery.queue import SCHEMES, TASK_NAME, _new_app, parse_celery_url
from csvimg.engine import Engine
from csvimg.jobs import Item, now
from csvimg.settings import Settings

__all__ = ["app_from_env", "item_wait", "make_app"]

log = logging.getLogger("csvimg.celery")

# Retries of a task whose storage failed: back off 1, 2, 4 ... up to 60 s.
# Past the limit the task gives up and the sweeper of `Engine.run_worker`
# re-enqueues the item once its lease has run out.
_MAX_RETRIES: Final = 100
_MAX_BACKOFF: Final = 60.0

# How long a second delivery waits between looks at an item another worker
# holds: the lease's remaining time, within these bounds.
_MIN_WAIT: Final = 0.5
_MAX_WAIT: Final = 30.0


# -- the Celery app -----------------------------------------------------------


def make_app(settings: Settings, *, url: str | None = None) -> Celery:
    """Build the Celery app of csvimg: broker, queue and the ``csvimg.process_item`` task.

    The broker and queue come from *url* (default:
    ``settings.effective_queue_url``), which must be a Celery queue URL.
    The task runs `Engine.process_item` on an engine built from *settings*,
    one per worker process (see `_WorkerRuntime`). Connects the handlers of
    Celery's worker signals that close those engines (once per process,
    however many apps are made).
    """
    parsed = parse_celery_url(url or settings.effective_queue_url)
    app = _new_app(parsed)
    _connect_signals()
    runtime = _WorkerRuntime(settings)

    def process_item(task: Any, item_id: str) -> None:
        """Process one csvimg item (fetch, compress, store, count)."""
        runtime.run(task, item_id)

    # Called, not used as a decorator: celery is untyped, and an untyped
    # decorator would make the function untyped for mypy. Not shared: a
    # shared task is added to every app created later, so a second app
    # (another queue URL, a test) would run the first app's engine.
    app.task(
        name=TASK_NAME, bind=True, shared=False, ignore_result=True, max_retries=_MAX_RETRIES
    )(process_item)
    return app


def app_from_env() -> Celery:
    """Build the app of ``celery -A csvimg.backends.celery worker`` from ``CSVIMG_*``.

    Built from ``Settings.from_env()``: ``CSVIMG_QUEUE`` names the broker
    and queue (it must be a Celery queue URL, else `ConfigError`),
    ``CSVIMG_STORAGE`` / ``CSVIMG_BLOBS`` where results go. The package's
    module ``__getattr__`` calls this once, on first access of ``app``.
    """
    settings = Settings.from_env()
    if settings.effective_queue_url.partition("://")[0].lower() not in SCHEMES:
        raise ConfigError(
            "CSVIMG_QUEUE must be a Celery queue URL for Celery workers, e.g. "
            "celery+amqp://guest:guest@127.0.0.1:5672// (see docs/celery.md)"
        )
    # Build (not open) the backends once here, in the worker's main
    # process: a bad URL stops `celery worker` at start-up with its
    # message, instead of failing (and acknowledging) every task.
    Engine(settings)
    return make_app(settings)


def item_wait(item: Item | None, at: float) -> float | None:
    """Seconds to wait before looking at *item* again, or None when it needs no task.

    `Engine.process_item` drops an item another worker holds. Over a Celery
    queue the holder may have died (its tasks came back at once, its lease
    has not ended yet): rather than lose the item until the sweeper finds
    it, the task looks again when the lease ends and takes it over then.
    """
    if item is None or item.status.finished:
        return None
    lease_left = (item.lease_until or at) - at
    return min(_MAX_WAIT, max(_MIN_WAIT, lease_left + 0.25))


class _WorkerRuntime:
    """The engine and event loop of one worker process, opened on the first task.

    A prefork pool forks its processes from the main one, and neither an
    event loop thread nor open connections survive a fork: everything is
    built lazily in the process that runs tasks, remembered with its pid,
    and built again when a fork changed the pid. The event loop lives in a
    blocking portal (a thread) for the process's lifetime, so connection
    pools and HTTP keep-alive are reused across tasks; `close` (on Celery's
    shutdown signals) closes the engine, then the loop.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._portal_cm: Any = None
        self._portal: BlockingPortal | None = None
        self._engine: Engine | None = None
        _RUNTIMES.add(self)

    def _ensure(self) -> tuple[Engine, BlockingPortal]:
        with self._lock:
            if self._pid != os.getpid():
                self._forget()
            if self._engine is None or self._portal is None:
                cm = start_blocking_portal(name="csvimg-celery-loop")
                portal = cm.__enter__()
                engine = Engine(self.settings)
                try:
                    portal.call(engine.open)
                except BaseException:
                    cm.__exit__(None, None, None)
                    raise
                self._pid, self._portal_cm, self._portal, self._engine = (
                    os.getpid(), cm, portal, engine,
                )
                log.info("csvimg engine open in worker process %d", self._pid)
            return self._engine, self._portal

    def _forget(self) -> None:
        # Inherited from the parent across a fork: the loop thread does not
        # exist here, so there is nothing to close, only to drop.
        self._pid = self._portal_cm = self._portal = self._engine = None

    def run(self, task: Any, item_id: str) -> None:
        """Process one item; retry the task when storage failed or the item is held."""
        try:
            engine, portal = self._ensure()
            finished = portal.call(engine.process_item, item_id)
            item = portal.call(engine.storage.get_item, item_id) if finished else None
        except StorageError as exc:
            # Raising would make Celery acknowledge a failed task (acks_late
            # acks failures too): the message would be gone. A retry
            # publishes a fresh copy with a countdown, then acks this one.
            retries = int(task.request.retries)
            countdown = min(_MAX_BACKOFF, 2.0**retries)
            log.error("item %s: storage failed, retrying in %.0f s: %s", item_id, countdown, exc)
            raise task.retry(exc=exc, countdown=countdown) from exc
        wait = 1.0 if not finished else item_wait(item, now())
        if wait is None:
            return
        if int(task.request.retries) >= _MAX_RETRIES:
            log.warning("item %s still held by another worker; leaving it to the sweeper", item_id)
            return
        log.info("item %s is held by another worker; looking again in %.1f s", item_id, wait)
        raise task.retry(countdown=wait)

    def close(self) -> None:
        """Close the engine and stop the event loop (a no-op when never opened here)."""
        with self._lock:
            if self._pid != os.getpid() or self._portal is None:
                self._forget()
                return
            portal, cm, engine = self._portal, self._portal_cm, self._engine
            self._forget()
        try:
            if engine is not None:
                portal.call(engine.close)
        except Exception:
            log.exception("closing the csvimg engine failed")
        finally:
            cm.__exit__(None, None, None)
        log.info("csvimg engine closed in worker process %d", os.getpid())


_RUNTIMES: weakref.WeakSet[_WorkerRuntime] = weakref.WeakSet()


def _close_runtimes(**_: Any) -> None:
    for runtime in list(_RUNTIMES):
        runtime.close()


def _forget_runtimes(**_: Any) -> None:
    for runtime in list(_RUNTIMES):
        with runtime._lock:
            runtime._forget()


def _connect_signals() -> None:
    """Connect the runtimes' handlers to Celery's worker signals (idempotent).

    A prefork pool process sends worker_process_init after the fork and
    worker_process_shutdown before it exits; the solo and threads pools run
    tasks in the main process, which sends worker_shutdown. The loop thread
    is not a daemon: without these, an interpreter exit would wait for it.
    The ``dispatch_uid`` makes a second connection a no-op.
    """
    signals.worker_process_init.connect(_forget_runtimes, weak=False, dispatch_uid="csvimg-init")
    signals.worker_process_shutdown.connect(
        _close_runtimes, weak=False, dispatch_uid="csvimg-pexit"
    )
    signals.worker_shutdown.connect(_close_runtimes, weak=False, dispatch_uid="csvimg-exit")
