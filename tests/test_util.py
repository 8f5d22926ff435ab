"""Tests of csvimg._util: the URL masks and Retry-After, shared by several modules."""

from __future__ import annotations

import email.utils
import time

import pytest

from csvimg._util import mask_password, parse_retry_after, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://guest:secret@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("postgresql://u:p@ss@db/app?sslmode=require", "postgresql://u:***@db/app?sslmode=require"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://user@cache/0", "redis://user@cache/0"),  # no password to hide
        ("memory://", "memory://"),
        ("sqlite:///var/lib/csvimg.db", "sqlite:///var/lib/csvimg.db"),
        ("not a url", "not a url"),
    ],
)
def test_mask_password(url: str, expected: str) -> None:
    assert mask_password(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pw@host:8443/a.jpg?token=x", "https://host:8443/a.jpg?..."),
        ("http://[::1]/a.jpg", "http://[::1]/a.jpg"),
        ("http://h/" + "p" * 300, "http://h/" + "p" * 199 + "..."),
        ("http://[::1/", "<malformed URL>"),
        ("", "<empty URL>"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_parse_retry_after_cap_and_clock() -> None:
    now = time.time()
    assert parse_retry_after("99999999") == 3600
    assert parse_retry_after("99999999", cap=86400) == 86400
    in_2h = email.utils.formatdate(now + 7200, usegmt=True)
    assert parse_retry_after(in_2h, now=now, cap=86400) == pytest.approx(7200, abs=1)
    assert parse_retry_after("nan") is None
    assert parse_retry_after("-5") == 0
