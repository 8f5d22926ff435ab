"""`_StorageBase`: what `RedisStorage` does besides requests and items.

Its connection life cycle, key names and script calls, and its webhooks
and outbox; `RedisStorage` (in `csvimg.backends.redis.storage`) adds
requests, items and the ledger operations on them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import attrs
import redis.asyncio as aioredis

from csvimg import ledger
from csvimg._errors import NotFoundError, StorageError
from csvimg.backends.redis._connection import _aclose, _Connection, _json, _opt_float, _pairs, _t
from csvimg.backends.redis._lua import script
from csvimg.jobs import Delivery, Event, Webhook

_SCRIPTS: Final = (
    ("reserve", script("reserve_request")),
    ("write_rows", script("write_rows")),
    ("write_items", script("write_items")),
    ("commit", script("commit_request")),
    ("discard", script("discard_request")),
    ("get_item", script("get_item", "_committed")),
    ("start", script("start_item", "_committed")),
    ("extend", script("extend_lease", "_committed")),
    ("finish", script("finish_item", "_committed")),
    ("stale", script("stale_items")),
    ("claim_events", script("claim_events")),
    ("reschedule", script("reschedule_event")),
    ("add_webhook", script("add_webhook", "_owner_index")),
    ("delete_webhook", script("delete_webhook")),
    ("webhook_active", script("set_webhook_active")),
)
"""The scripts `RedisStorage` registers: the name it calls each by, its text."""


class _StorageBase:
    """The connection, keys, scripts, webhooks and outbox of `RedisStorage`."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        self._conn = _Connection.parse(url)
        self.prefix = self._conn.prefix
        """The key prefix of this deployment."""
        self._client: aioredis.Redis | None = None
        p = self.prefix
        self._k_requests = f"{p}:requests"
        self._k_pending = f"{p}:pending"
        self._k_leases = f"{p}:leases"
        self._k_due = f"{p}:due"

    # Keys ---------------------------------------------------------------

    def _k_req(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def _k_item(self, item_id: str) -> str:
        return f"{self.prefix}:item:{item_id}"

    def _k_owner(self, owner: str) -> str:
        return f"{self.prefix}:requests:o:{owner}"

    def _k_hooks(self, owner: str | None) -> str:
        return f"{self.prefix}:webhooks:-" if owner is None else f"{self.prefix}:webhooks:o:{owner}"

    # Life cycle ---------------------------------------------------------

    @property
    def _r(self) -> aioredis.Redis:
        if self._client is None:
            raise StorageError(f"Redis storage at {self._conn.where} is not open")
        return self._client

    async def open(self) -> None:
        """Connect and check the server answers (Redis needs no schema)."""
        if self._client is None:
            client = self._conn.client()
            self._scripts = {
                name: client.register_script(source) for name, source in _SCRIPTS
            }
            self._client = client
        await self.ping()

    async def close(self) -> None:
        """Close the connection pool; a later `open` connects again."""
        client, self._client = self._client, None
        if client is not None:
            await _aclose(client)

    async def ping(self) -> None:
        """Raise `StorageError` unless Redis answers."""
        with self._conn.errors("pinging"):
            await self._r.ping()

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        self._r  # noqa: B018 - raises StorageError when closed
        return await self._scripts[name](keys=keys, args=args)

    async def _pipelined(
        self, doing: str, calls: Sequence[tuple[str, list[str], list[str | int]]]
    ) -> list[Any]:
        """Run scripts in one MULTI/EXEC round trip; return their answers in order.

        Each script is replay-safe on its own (a token per call), so the
        client may send the whole transaction again after a broken
        connection.
        """
        with self._conn.errors(doing):
            async with self._r.pipeline(transaction=True) as pipe:
                for name, keys, args in calls:
                    await self._scripts[name](keys=keys, args=args, client=pipe)
                return list(await pipe.execute())

    # Webhooks -----------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register (or replace) a receiver."""
        fields = [
            "id", webhook.id, "url", webhook.url, "secret", webhook.secret,
            "created_at", _t(webhook.created_at), "active", "1" if webhook.active else "0",
        ]
        if webhook.owner is not None:
            fields += ["owner", webhook.owner]
        with self._conn.errors("adding a webhook"):
            await self._script(
                "add_webhook",
                [f"{self.prefix}:webhook:{webhook.id}", self._k_hooks(webhook.owner)],
                [self.prefix, webhook.id, _t(webhook.created_at), *fields],
            )

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Registrations of *owner*, oldest first."""
        with self._conn.errors("listing webhooks"):
            ids = cast("list[str]", await self._r.zrange(self._k_hooks(owner), 0, -1))
            async with self._r.pipeline(transaction=False) as pipe:
                for hook_id in ids:
                    pipe.hgetall(f"{self.prefix}:webhook:{hook_id}")
                found: list[dict[str, str]] = await pipe.execute()
        return [
            Webhook(
                id=h["id"],
                url=h["url"],
                secret=h["secret"],
                created_at=float(h["created_at"]),
                owner=h.get("owner"),
                active=h.get("active", "1") == "1",
            )
            for h in found
            if h
        ]

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable a registration (unknown ids are ignored)."""
        with self._conn.errors("updating a webhook"):
            await self._script(
                "webhook_active",
                [f"{self.prefix}:webhook:{webhook_id}"],
                ["1" if active else "0"],
            )

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete a registration of *owner*; False when there was none."""
        with self._conn.errors("deleting a webhook"):
            ok = await self._script(
                "delete_webhook",
                [f"{self.prefix}:webhook:{webhook_id}", self._k_hooks(owner)],
                [webhook_id, "0" if owner is None else "1", owner or ""],
            )
        return bool(ok)

    # Outbox -------------------------------------------------------------

    @staticmethod
    def _event(h: Mapping[str, str]) -> Event:
        return Event(
            id=h["id"],
            type=h["type"],
            request_id=h["request_id"],
            created_at=float(h["created_at"]),
            owner=h.get("owner"),
            callback_url=h.get("callback_url"),
            attempts=int(h.get("attempts", "0")),
            next_attempt_at=_opt_float(h.get("next_attempt_at")),
        )

    async def _lease_events(self, op: ledger.LeaseEvents) -> ledger.Changes:
        """Lease up to *limit* due events (oldest first among those taken)."""
        if op.limit <= 0:
            return ledger.Changes()
        until = op.now + op.lease_seconds
        with self._conn.errors("claiming events"):
            raw = await self._script(
                "claim_events", [self._k_due], [_t(op.now), op.limit, _t(until), self.prefix]
            )
        events = [attrs.evolve(self._event(_pairs(r)), lease_until=until) for r in raw if r]
        return ledger.Changes(events=tuple(sorted(events, key=lambda e: e.created_at)))

    async def _reschedule_event(self, op: ledger.RescheduleEvent) -> ledger.Changes:
        """Schedule the next round (None: delivered); `NotFoundError` if unknown."""
        at = op.next_attempt_at
        with self._conn.errors("rescheduling an event"):
            ok = await self._script(
                "reschedule",
                [f"{self.prefix}:event:{op.event_id}", self._k_due],
                ["" if at is None else _t(at), op.event_id],
            )
        if not ok:
            raise NotFoundError(f"no event {op.event_id}")
        return ledger.Changes()

    async def add_delivery(self, request_id: str, delivery: Delivery) -> None:
        """Append one attempt to the request's log."""
        with self._conn.errors("logging a delivery"):
            await self._r.rpush(
                f"{self.prefix}:deliveries:{request_id}", _json(attrs.asdict(delivery))
            )

    async def list_deliveries(self, request_id: str) -> list[Delivery]:
        """Return the request's delivery attempts, oldest first."""
        with self._conn.errors("reading deliveries"):
            raw = await self._r.lrange(f"{self.prefix}:deliveries:{request_id}", 0, -1)
        return [Delivery(**json.loads(d)) for d in raw]

