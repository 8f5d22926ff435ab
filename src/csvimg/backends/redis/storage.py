"""`RedisStorage`: Redis storage of requests, items, webhooks and the outbox.

The key layout, the three-step write of a request and how a replayed
command is recognised are described in `csvimg.backends.redis`; the Lua
scripts are in ``lua/`` (see `csvimg.backends.redis._lua`). This module
holds requests, items and the ledger operations on them; the connection,
webhooks and the outbox are in `csvimg.backends.redis._base`.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final, cast

import anyio
import attrs
from redis.exceptions import RedisError

from csvimg import ledger
from csvimg._errors import StorageError
from csvimg.backends.redis._base import _StorageBase
from csvimg.backends.redis._connection import (
    _json,
    _opt_float,
    _opt_int,
    _pairs,
    _t,
)
from csvimg.jobs import (
    Item,
    ItemIds,
    ItemResult,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
    item_rows,
    now,
)

if TYPE_CHECKING:
    from csvimg.settings import Settings

__all__ = ["RedisStorage"]

# Items per write script of create_request: each call holds Redis for
# ~15 ms (more on a busy machine), short enough for other clients not to
# notice, and 150 round trips for 300,000 items cost little.
_ITEMS_PER_SCRIPT: Final = 2000

_ITEM_FIELDS: Final = (
    "request_id", "row", "position", "url", "status", "attempts", "updated_at",
    "output_key", "content_type", "bytes_in", "bytes_out", "width", "height",
    "error_code", "error_message", "lease_until",
)
"""Every field an item hash may hold, in the order the write script reads them."""

_NEW_ITEM_FIELDS: Final = _ITEM_FIELDS[:7]
"""The fields of a new item (request_id ... updated_at), as `_stage` writes them."""

# How long a request being written stays reserved without progress; after
# that its leftovers count as abandoned (see create_request).
_STAGING_TTL: Final = 600

# Rows never change once stored, so they are kept in pages of this many
# (one JSON array per list element): a 300,000-row upload is 300 list
# elements, and any page of rows is one LRANGE of at most two of them.
_ROWS_PAGE: Final = 1000


class RedisStorage(_StorageBase):
    """Storage in Redis; see `csvimg.backends.Storage` and `csvimg.backends.redis`.

    Safe to share between tasks of one event loop; each process (or event
    loop) builds its own.
    """

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisStorage:
        """Build from ``redis://host:port/db?prefix=name`` (unopened)."""
        return cls(url)

    # Requests -----------------------------------------------------------

    def _request_fields(self, request: Request) -> dict[str, str]:
        fields = {
            "id": request.id,
            "status": request.status.value,
            "created_at": _t(request.created_at),
            "updated_at": _t(request.updated_at),
            "total": str(request.total),
            "done": str(request.done),
            "failed": str(request.failed),
            "header": _json(list(request.header)),
            "url_column": str(request.url_column),
            "options": _json(request.options.to_dict()),
        }
        for name in ("callback_url", "owner", "filename"):
            value = getattr(request, name)
            if value is not None:
                fields[name] = value
        return fields

    @staticmethod
    def _request(h: Mapping[str, str]) -> Request:
        return Request(
            id=h["id"],
            status=RequestStatus(h["status"]),
            created_at=float(h["created_at"]),
            updated_at=float(h["updated_at"]),
            total=int(h["total"]),
            done=int(h["done"]),
            failed=int(h["failed"]),
            header=tuple(json.loads(h["header"])),
            url_column=int(h["url_column"]),
            callback_url=h.get("callback_url"),
            options=ProcessOptions.from_dict(json.loads(h["options"])),
            owner=h.get("owner"),
            filename=h.get("filename"),
        )

    @staticmethod
    def _item(item_id: str, h: Mapping[str, str]) -> Item:
        return Item(
            id=item_id,
            request_id=h["request_id"],
            row=int(h["row"]),
            position=int(h["position"]),
            url=h["url"],
            status=ItemStatus(h["status"]),
            attempts=int(h.get("attempts", "0")),
            output_key=h.get("output_key"),
            content_type=h.get("content_type"),
            bytes_in=_opt_int(h.get("bytes_in")),
            bytes_out=_opt_int(h.get("bytes_out")),
            width=_opt_int(h.get("width")),
            height=_opt_int(h.get("height")),
            error_code=h.get("error_code"),
            error_message=h.get("error_message"),
            lease_until=_opt_float(h.get("lease_until")),
            updated_at=float(h["updated_at"]),
        )

    async def create_request(self, request: Request, rows: Sequence[Row]) -> None:
        """Store the request, its rows and their items; nothing is visible until all are.

        Rows and items are written in chunks (each chunk one short script,
        so Redis keeps serving other clients while a 300,000-item upload is
        stored), then one script commits the request hash. Until that commit
        no read path shows the request or its items. An id that exists, or
        is being created, is refused with `StorageError`. When writing
        fails, what was written is removed; if the writer dies instead, the
        leftovers are removed by a later `stale_items` sweep once the
        staging marker has expired.
        """
        rid = request.id
        rkey = self._k_req(rid)
        marker = f"{self.prefix}:staging:{rid}"
        token = uuid.uuid4().hex
        with self._conn.errors("creating a request"):
            if not await self._script("reserve", [rkey, marker], [_STAGING_TTL, token]):
                raise StorageError(f"request {rid} exists already")
        written = [0]
        try:
            with self._conn.errors("creating a request"):
                await self._stage(request, rows, marker, written)
                keys = [rkey, self._k_requests, marker]
                if request.owner is not None:
                    keys.append(self._k_owner(request.owner))
                fields = [v for pair in self._request_fields(request).items() for v in pair]
                committed = await self._script(
                    "commit", keys, [_t(request.created_at), rid, *fields]
                )
            if not committed:
                raise StorageError(
                    f"request {rid} was abandoned while being written "
                    f"(its staging marker expired after {_STAGING_TTL} s)"
                )
        except BaseException:
            # Shielded and bounded: runs even when the caller was cancelled,
            # and never hides the original error.
            with anyio.move_on_after(10, shield=True):
                await self._discard(rid, max(written[0], request.total), marker)
            raise

    async def _stage(
        self, request: Request, rows: Sequence[Row], marker: str, written: list[int] | None = None
    ) -> None:
        """Write rows and items of a reserved, not yet committed request.

        Items are made from the rows as they are sent (`item_rows`), a
        chunk at a time; ``written[0]`` counts the items sent so far.
        """
        rid = request.id
        # Encode and send a few pages at a time: the event loop (an API
        # server's, say) gets to run between them.
        rows_keys = [f"{self.prefix}:rows:{rid}", marker]
        for first in range(0, len(rows), 10 * _ROWS_PAGE):
            pages = [
                _json([[r.index, r.line, r.cells, r.urls] for r in rows[i : i + _ROWS_PAGE]])
                for i in range(first, min(len(rows), first + 10 * _ROWS_PAGE), _ROWS_PAGE)
            ]
            if not await self._script("write_rows", rows_keys, [first // _ROWS_PAGE, *pages]):
                raise StorageError(f"request {rid} was abandoned while being written")
        keys = [f"{self.prefix}:itemids:{rid}", self._k_pending, self._k_leases, marker]
        item_prefix = f"{self.prefix}:item:"
        # A new item sets these fields only (the script skips absent ones).
        names = _json(_NEW_ITEM_FIELDS)
        at = _t(request.created_at)
        id_prefix = f"{rid}."
        pending = ItemStatus.PENDING.value
        made = (
            [id_prefix + str(seq), rid, row, position, url, pending, 0, at]
            for seq, row, position, url in item_rows(rows)
        )
        start = 0
        while chunk := list(itertools.islice(made, _ITEMS_PER_SCRIPT)):
            # One script call per chunk writes its item hashes server-side:
            # queued one HSET at a time they cost the client ~40 us each.
            ok = await self._script(
                "write_items", keys, [item_prefix, names, _json(chunk), _STAGING_TTL, start]
            )
            if not ok:
                raise StorageError(f"request {rid} was abandoned while being written")
            start += len(chunk)
            if written is not None:
                written[0] = start

    async def _discard(self, rid: str, total: int, marker: str) -> None:
        """Remove what a failed `create_request` wrote (best effort).

        *total*: how many items may have been written (ids beyond those
        written are harmless to remove).
        """
        keys = [
            self._k_req(rid), marker, f"{self.prefix}:rows:{rid}",
            f"{self.prefix}:itemids:{rid}", self._k_pending, self._k_leases,
        ]
        item_prefix = f"{self.prefix}:item:"
        ids = ItemIds(rid, total)
        try:
            for start in range(0, len(ids), 1000):
                await self._script(
                    "discard", keys, [item_prefix, "0", *ids[start : start + 1000]]
                )
            await self._script("discard", keys, [item_prefix, "1"])
        except (RedisError, StorageError, OSError):
            pass  # Redis is away: the sweeper removes the leftovers later

    async def get_request(self, request_id: str) -> Request | None:
        """Return the request or None."""
        with self._conn.errors("reading a request"):
            h = cast("dict[str, str]", await self._r.hgetall(self._k_req(request_id)))
        return self._request(h) if h else None

    async def list_requests(self, *, owner: str | None = None, limit: int = 50) -> list[Request]:
        """Newest first (of *owner* when given)."""
        if limit <= 0:
            return []
        index = self._k_requests if owner is None else self._k_owner(owner)
        with self._conn.errors("listing requests"):
            ids = cast("list[str]", await self._r.zrevrange(index, 0, limit - 1))
            async with self._r.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hgetall(self._k_req(rid))
                found: list[dict[str, str]] = await pipe.execute()
        return [self._request(h) for h in found if h]

    async def _committed_range(self, request_id: str, key: str, first: int, last: int) -> list[str]:
        """LRANGE *key*, or nothing while the request is not committed."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.exists(self._k_req(request_id))
            pipe.lrange(key, first, last)
            exists, found = await pipe.execute()
        return list(found) if exists else []

    async def list_rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Rows in upload order (read from the pages that hold them)."""
        if limit <= 0 or offset < 0:
            return []
        first, last = offset // _ROWS_PAGE, (offset + limit - 1) // _ROWS_PAGE
        with self._conn.errors("reading rows"):
            pages = await self._committed_range(
                request_id, f"{self.prefix}:rows:{request_id}", first, last
            )
        skip = offset - first * _ROWS_PAGE
        found = [row for page in pages for row in json.loads(page)][skip : skip + limit]
        return [
            Row(index=index, line=line, cells=tuple(cells), urls=tuple(urls))
            for index, line, cells, urls in found
        ]

    async def list_items(
        self, request_id: str, *, offset: int = 0, limit: int = 1000
    ) -> list[Item]:
        """Items in (row, position) order."""
        if limit <= 0 or offset < 0:
            return []
        with self._conn.errors("reading items"):
            ids = await self._committed_range(
                request_id, f"{self.prefix}:itemids:{request_id}", offset, offset + limit - 1
            )
            async with self._r.pipeline(transaction=False) as pipe:
                for item_id in ids:
                    pipe.hgetall(self._k_item(item_id))
                found: list[dict[str, str]] = await pipe.execute()
        return [self._item(i, h) for i, h in zip(ids, found, strict=True) if h]

    async def get_item(self, item_id: str) -> Item | None:
        """Return the item, or None when unknown (or its request is not committed)."""
        with self._conn.errors("reading an item"):
            raw = await self._script("get_item", [self._k_item(item_id)], [self.prefix])
        return None if raw is None else self._item(item_id, _pairs(raw))

    # Item state changes (Lua) -------------------------------------------

    async def apply(self, op: ledger.Operation) -> ledger.Changes:
        """Apply a ledger operation by the Lua form of its rules (see the protocol).

        Each operation maps to its script, one per item in one MULTI/EXEC
        where it takes many; the contract suite's state machine checks the
        scripts against `csvimg.ledger`, their model.
        """
        match op:
            case ledger.StartItems():
                return await self._start_items(op)
            case ledger.FinishItems():
                return await self._finish_items(op)
            case ledger.ExtendLeases():
                return await self._extend_leases(op)
            case ledger.Sweep():
                return await self._sweep(op)
            case ledger.LeaseEvents():
                return await self._lease_events(op)
            case ledger.RescheduleEvent():
                return await self._reschedule_event(op)
        raise TypeError(f"RedisStorage cannot apply {type(op).__name__}")

    async def _start_items(self, op: ledger.StartItems) -> ledger.Changes:
        """Lease: one start script per id, all in one MULTI/EXEC.

        An item started past ``max_attempts`` is then finished as
        ``too-many-attempts`` (it is this call's to finish: it holds the
        lease), in a second round trip that happens only then.
        """
        if not op.item_ids:
            return ledger.Changes()
        calls = [
            ("start", *self._start_call(i, op.at, op.lease_seconds, uuid.uuid4().hex))
            for i in op.item_ids
        ]
        answers = await self._pipelined("starting items", calls)
        leased = [
            self._item(i, _pairs(raw))
            for i, raw in zip(op.item_ids, answers, strict=True)
            if raw is not None
        ]
        limit = op.max_attempts
        over = [item for item in leased if limit is not None and item.attempts > limit]
        if not over:
            return ledger.Changes(items=tuple(leased), started=tuple(leased))
        results = [(i, ledger.too_many_attempts(i.attempts)) for i in over]
        given_up = await self._finish_items(
            ledger.FinishItems([(i.id, result) for i, result in results], op.at)
        )
        started = tuple(item for item in leased if item not in over)
        settled = tuple(ledger.settle_item(i, result, at=op.at) for i, result in results)
        return attrs.evolve(given_up, items=started + settled, started=started)

    def _start_call(
        self, item_id: str, at: float, lease_seconds: float, token: str
    ) -> tuple[list[str], list[str | int]]:
        return (
            [self._k_item(item_id), self._k_pending, self._k_leases],
            [_t(at), _t(at + lease_seconds), item_id, self.prefix, token],
        )

    async def _start(self, item_id: str, lease_seconds: float, token: str) -> Item | None:
        """Start one item as the call named *token* (a replay answers the same)."""
        with self._conn.errors("starting an item"):
            call = self._start_call(item_id, now(), lease_seconds, token)
            raw = await self._script("start", *call)
        return None if raw is None else self._item(item_id, _pairs(raw))

    async def _finish(self, item_id: str, result: ItemResult, event_id: str) -> Request | None:
        """Finish one item as the call named *event_id* (a replay answers the same)."""
        with self._conn.errors("finishing an item"):
            raw = await self._script("finish", *self._finish_call(item_id, result, event_id, now()))
        return None if raw is None else self._request(_pairs(raw))

    async def _finish_items(self, op: ledger.FinishItems) -> ledger.Changes:
        """Settle: one finish script per result, all in one MULTI/EXEC."""
        if not op.results:
            return ledger.Changes()
        calls = [
            ("finish", *self._finish_call(i, result, f"msg_{uuid.uuid4().hex}", op.at))
            for i, result in op.results
        ]
        answers = await self._pipelined("finishing items", calls)
        finished = tuple(self._request(_pairs(raw)) for raw in answers if raw is not None)
        return ledger.Changes(requests=finished, finished=finished)

    async def _extend_leases(self, op: ledger.ExtendLeases) -> ledger.Changes:
        """Push the leases of the PROCESSING items among the ids: one round trip."""
        if not op.item_ids:
            return ledger.Changes()
        until = _t(op.at + op.lease_seconds)
        calls: list[tuple[str, list[str], list[str | int]]] = [
            ("extend", [self._k_item(i), self._k_leases], [until, i, self.prefix])
            for i in op.item_ids
        ]
        answers = await self._pipelined("extending leases", calls)
        extended = tuple(i for i, ok in zip(op.item_ids, answers, strict=True) if ok)
        return ledger.Changes(ids=extended)

    def _finish_call(
        self, item_id: str, result: ItemResult, event_id: str, at: float
    ) -> tuple[list[str], list[str | int]]:
        values = {
            "output_key": result.output_key,
            "content_type": result.content_type,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "width": result.width,
            "height": result.height,
            "error_code": result.error_code,
            "error_message": result.error_message,
        }
        present = [(k, str(v)) for k, v in values.items() if v is not None]
        absent = [k for k, v in values.items() if v is None]
        args: list[str | int] = [
            _t(at), item_id, self.prefix, "1" if result.ok else "0", event_id, len(present),
        ]
        for name, value in present:
            args += [name, value]
        args += absent
        return [self._k_item(item_id), self._k_pending, self._k_leases, self._k_due], args

    async def _sweep(self, op: ledger.Sweep) -> ledger.Changes:
        """Ids of expired leases (moved back to PENDING) and forgotten PENDING items."""
        if op.limit <= 0:
            return ledger.Changes()
        with self._conn.errors("looking for stale items"):
            found = await self._script(
                "stale",
                [self._k_pending, self._k_leases],
                [_t(op.now), _t(op.pending_before), op.limit, self.prefix],
            )
        return ledger.Changes(ids=tuple(found))
