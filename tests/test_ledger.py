"""The job's rules as pure functions: `csvimg.ledger` without any backend."""

from __future__ import annotations

import pytest

from csvimg import ledger
from csvimg._errors import NotFoundError
from csvimg.jobs import Event, Item, ItemResult, ItemStatus, Request, RequestStatus, item_id


def _state(total: int = 2, **item_changes: object) -> ledger.State:
    request = Request(id="r", total=total, created_at=0.0, updated_at=0.0)
    items = {
        item_id("r", n): Item(id=item_id("r", n), request_id="r", row=n, position=0,
                              url=f"https://example.com/{n}.jpg", updated_at=0.0)
        for n in range(total)
    }
    return ledger.State(items=items, requests={"r": request})


def _apply(state: ledger.State, op: ledger.Operation) -> tuple[ledger.State, ledger.Changes]:
    changes = op.decide(state)
    items = dict(state.items) | {i.id: i for i in changes.items}
    requests = dict(state.requests) | {r.id: r for r in changes.requests}
    events = dict(state.events) | {e.id: e for e in changes.events}
    return ledger.State(items=items, requests=requests, events=events), changes


def test_start_leases_moves_the_request_and_refuses_a_live_lease() -> None:
    state, changes = _apply(_state(), ledger.StartItems(("r.0", "r.0", "r.9"), at=10.0,
                                                          lease_seconds=5))
    assert [i.id for i in changes.started] == ["r.0"]
    assert state.items["r.0"].status is ItemStatus.PROCESSING
    assert state.items["r.0"].attempts == 1 and state.items["r.0"].lease_until == 15.0
    assert state.requests["r"].status is RequestStatus.PROCESSING
    _, again = _apply(state, ledger.StartItems(("r.0",), at=12.0, lease_seconds=5))
    assert again.started == () and again.empty
    _, taken = _apply(state, ledger.StartItems(("r.0",), at=16.0, lease_seconds=5))
    assert taken.started[0].attempts == 2


def test_too_many_attempts_fails_the_item_and_can_finish_the_request() -> None:
    state = _state(total=1)
    for at in (10.0, 20.0):
        state, _ = _apply(state, ledger.StartItems(("r.0",), at=at, lease_seconds=1,
                                                   max_attempts=2))
    state, changes = _apply(state, ledger.StartItems(("r.0",), at=30.0, lease_seconds=1,
                                                     max_attempts=2))
    assert changes.started == ()
    assert state.items["r.0"].error_code == "too-many-attempts"
    assert [r.status for r in changes.finished] == [RequestStatus.FAILED]
    assert [e.type for e in changes.events] == ["request.failed"]


def test_finish_settles_once_counts_and_records_one_event() -> None:
    ok = ItemResult(output_key="r/0.jpg", content_type="image/jpeg")
    bad = ItemResult.failure("http-404", "gone")
    state, changes = _apply(_state(), ledger.FinishItems((("r.0", ok), ("r.0", bad)), at=5.0))
    assert state.items["r.0"].status is ItemStatus.DONE
    assert state.requests["r"].done == 1 and changes.finished == ()
    state, changes = _apply(state, ledger.FinishItems((("r.1", bad),), at=6.0))
    assert state.requests["r"].status is RequestStatus.COMPLETED
    assert [r.id for r in changes.finished] == ["r"] and len(changes.events) == 1
    _, again = _apply(state, ledger.FinishItems((("r.1", ok),), at=7.0))
    assert again.empty and again.finished == ()


def test_sweep_takes_back_expired_leases_first_and_keeps_the_limit() -> None:
    state, _ = _apply(_state(total=3), ledger.StartItems(("r.0",), at=1.0, lease_seconds=1))
    state, changes = _apply(state, ledger.Sweep(now=100.0, pending_before=50.0, limit=2))
    assert changes.ids == ("r.0", "r.1")
    assert state.items["r.0"].status is ItemStatus.PENDING
    _, second = _apply(state, ledger.Sweep(now=100.0, pending_before=50.0, limit=10))
    assert second.ids == ("r.2",)


def test_events_are_leased_once_and_rescheduled() -> None:
    event = Event(id="e", type="request.completed", request_id="r", created_at=0.0,
                  next_attempt_at=1.0)
    state = ledger.State(events={"e": event})
    state, leased = _apply(state, ledger.LeaseEvents(now=2.0, limit=5, lease_seconds=60))
    assert [e.id for e in leased.events] == ["e"]
    _, none = _apply(state, ledger.LeaseEvents(now=3.0, limit=5, lease_seconds=60))
    assert none.events == ()
    state, _ = _apply(state, ledger.RescheduleEvent("e", next_attempt_at=None))
    assert state.events["e"].attempts == 1 and state.events["e"].next_attempt_at is None
    with pytest.raises(NotFoundError):
        ledger.RescheduleEvent("nope", 1.0).decide(state)


def test_negative_lease_is_refused_where_it_is_passed() -> None:
    with pytest.raises(ValueError, match="lease_seconds must not be negative"):
        ledger.StartItems(("r.0",), at=0.0, lease_seconds=-1)
