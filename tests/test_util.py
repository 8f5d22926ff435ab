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


def test_env_int_reads_whole_numbers_and_names_the_variable() -> None:
    from csvimg import ConfigError
    from csvimg._util import env_int

    assert env_int({}, "CSVIMG_X", 7) == 7
    assert env_int({"CSVIMG_X": "  "}, "CSVIMG_X", 7) == 7
    assert env_int({"CSVIMG_X": " 12 "}, "CSVIMG_X", 7, low=1) == 12
    with pytest.raises(ConfigError, match=r"CSVIMG_X must be a whole number, not '1\.5'"):
        env_int({"CSVIMG_X": "1.5"}, "CSVIMG_X", 7)
    with pytest.raises(ConfigError, match=r"CSVIMG_X must be at least 1, not '0'"):
        env_int({"CSVIMG_X": "0"}, "CSVIMG_X", 7, low=1)


def test_env_float_refuses_negative_and_nan() -> None:
    from csvimg import ConfigError
    from csvimg._util import env_float

    assert env_float({"CSVIMG_Y": "2.5"}, "CSVIMG_Y", 1.0) == 2.5
    assert env_float({}, "CSVIMG_Y", 1.0) == 1.0
    for bad in ("-1", "nan"):
        with pytest.raises(ConfigError, match="CSVIMG_Y must not be negative"):
            env_float({"CSVIMG_Y": bad}, "CSVIMG_Y", 1.0)
    with pytest.raises(ConfigError, match="CSVIMG_Y must be a number"):
        env_float({"CSVIMG_Y": "soon"}, "CSVIMG_Y", 1.0)
