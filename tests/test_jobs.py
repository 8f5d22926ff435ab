"""The state machines: one table, illegal moves raise."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csvimg import ItemStatus, RequestStatus, TransitionError
from csvimg.jobs import (
    ITEM_TRANSITIONS,
    REQUEST_TRANSITIONS,
    Item,
    ProcessOptions,
    Request,
    check_item,
    check_request,
)


def test_request_life_cycle() -> None:
    r = Request(id="r")
    r = r.with_status(RequestStatus.PROCESSING)
    r = r.with_status(RequestStatus.COMPLETED)
    assert r.status.finished
    with pytest.raises(TransitionError, match="COMPLETED to PROCESSING"):
        r.with_status(RequestStatus.PROCESSING)


def test_item_lease_expiry_goes_back_to_pending() -> None:
    i = Item(id="r.0", request_id="r", row=0, position=0, url="https://x/y.jpg")
    i = i.with_status(ItemStatus.PROCESSING)
    i = i.with_status(ItemStatus.PENDING)
    i = i.with_status(ItemStatus.PROCESSING, attempts=2)
    i = i.with_status(ItemStatus.DONE, output_key="r/0.jpg")
    assert i.attempts == 2 and i.output_key == "r/0.jpg"
    for target in ItemStatus:
        with pytest.raises(TransitionError):
            i.with_status(target)


@pytest.mark.parametrize(
    ("a", "b"), list(itertools.product(RequestStatus, RequestStatus))
)
def test_request_table_is_the_only_rule(a: RequestStatus, b: RequestStatus) -> None:
    if b in REQUEST_TRANSITIONS[a]:
        check_request(a, b)
    else:
        with pytest.raises(TransitionError):
            check_request(a, b)


@given(st.lists(st.sampled_from(list(ItemStatus)), max_size=12))
def test_item_walks_follow_the_table(path: list[ItemStatus]) -> None:
    current = ItemStatus.PENDING
    for target in path:
        if target in ITEM_TRANSITIONS[current]:
            check_item(current, target)
            current = target
        else:
            with pytest.raises(TransitionError):
                check_item(current, target)
    # terminal states have no way out
    assert all(not ITEM_TRANSITIONS[s] for s in ItemStatus if s.finished)


def test_options_validate_and_round_trip() -> None:
    opts = ProcessOptions(quality=70, format="webp", max_dimension=800)
    assert opts.format == "WEBP"
    assert ProcessOptions.from_dict(opts.to_dict() | {"unknown": 1}) == opts
    with pytest.raises(ValueError, match="quality"):
        ProcessOptions(quality=0)
