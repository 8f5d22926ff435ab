"""The outbox delivery loop behind `Engine.run_outbox`.

Storage keeps one outbox event per finished request (written in the same
transaction as the state change). `run_outbox` leases due events, hands
each to the engine's notifier (webhooks by default, see `csvimg.webhooks`)
and stores when the next round is due (None: delivered or given up).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from csvimg import ledger
from csvimg._errors import StorageError
from csvimg.jobs import Event, now

if TYPE_CHECKING:
    from csvimg.engine import Engine

__all__ = ["run_outbox"]

log = logging.getLogger("csvimg.engine")


async def run_outbox(engine: Engine) -> None:
    """Deliver *engine*'s due outbox events until cancelled; return at once without a notifier."""
    notifier = engine.notifier
    if notifier is None:
        return
    await notifier.open()
    s = engine.settings
    storage = engine.storage
    while True:
        try:
            op = ledger.LeaseEvents(
                now=now(), limit=20, lease_seconds=max(60.0, 4 * s.webhook_timeout)
            )
            events: Sequence[Event] = (await storage.apply(op)).events
        except StorageError as exc:
            log.error("outbox unavailable: %s", exc)
            events = []
        try:
            for event in events:
                request = await storage.get_request(event.request_id)
                if request is None:  # pragma: no cover - storage keeps them together
                    await storage.apply(ledger.RescheduleEvent(event.id, None))
                    continue
                try:
                    next_at = await notifier.deliver(event, request)
                except Exception:
                    log.exception("event %s: notifier failed", event.id,
                                  extra={"event_id": event.id,
                                         "request_id": event.request_id})
                    next_at = now() + s.webhook_schedule[0] if s.webhook_schedule else None
                await storage.apply(ledger.RescheduleEvent(event.id, next_at))
        except StorageError as exc:
            # The claimed events come back when their lease ends.
            log.error("outbox: storage failed, retrying: %s", exc)
            events = []
        if not events:
            await anyio.sleep(s.outbox_interval)
