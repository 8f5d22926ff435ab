"""Structured logs: text and JSON lines with ids, and no secret ever written.

`configure_logging` is called inside each test (so its handler writes to
the test's captured stderr) and the root logger is restored afterwards.
The last tests run a whole flow with API keys, webhook secrets, callback
secrets and credentials in URLs at DEBUG level, in both formats, and grep
everything written for every one of those secrets.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.settings import Settings
from csvimg_server import create_app
from csvimg_server.logs import RedactingFilter, configure_logging, redact, register_secrets
from server_helpers import ThreadServer, make_csv, photo_host, wait_finished, wait_until
from servers import ImageHost

__all__ = ["photo_host"]  # fixture, imported for pytest

pytestmark = pytest.mark.timeout(60)

TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: "
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root logger (and httpx's) back as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


# ------------------------------------------------------------------ redaction


WHSEC = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"secret is {WHSEC}.", "secret is whsec_***."),
        ("Authorization: Bearer abcdefgh12345678", "Authorization: Bearer ***"),
        ("authorization: bearer abcdefgh12345678==", "authorization: bearer ***"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic ***"),
        ("GET https://user:p4ss@example.com/a.jpg", "GET https://***@example.com/a.jpg"),
        ("redis://:hunter2@cache:6379/0", "redis://***@cache:6379/0"),
        ("https://h/a.jpg?w=100&token=s3cr3t&h=5", "https://h/a.jpg?w=100&token=***&h=5"),
        ("https://s3/x?X-Amz-Signature=abc123&X-Amz-Credential=AKIA%2F",
         "https://s3/x?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("https://blob/x?sv=2020&sig=abc%3D", "https://blob/x?sv=2020&sig=***"),
        ("https://h/cb?api_key=k1&code=xyz#frag", "https://h/cb?api_key=***&code=***#frag"),
        # Ordinary text and ordinary queries stay readable.
        ("basic checks passed for https://h/a.jpg?w=100&limit=2",
         "basic checks passed for https://h/a.jpg?w=100&limit=2"),
        ("request 3f2a done: 2 images", "request 3f2a done: 2 images"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_registered_secrets_are_masked_anywhere() -> None:
    key = secrets.token_urlsafe(24)
    assert redact(f"x{key}y") == f"x{key}y"
    register_secrets([key])
    assert redact(f"x{key}y") == "x***y"


def test_the_filter_scrubs_arguments_tracebacks_and_fields() -> None:
    key = secrets.token_urlsafe(24)
    register_secrets([key])
    try:
        raise RuntimeError(f"failed with {WHSEC}")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "sent %s to %s", (key, "https://u:pw@h/?token=t"),
        exc_info,
    )
    record.__dict__["request_id"] = f"rid {key}"  # as extra= does
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == "sent *** to https://***@h/?token=***"
    assert record.exc_text is not None and "whsec_***" in record.exc_text
    assert WHSEC not in logging.Formatter().format(record)
    assert record.__dict__["request_id"] == "rid ***"


# ------------------------------------------------------------------ formats


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "json")
    log = logging.getLogger("csvimg.test")
    log.debug("plain %d", 1)
    log.warning("item %s failed", "r.0",
                extra={"request_id": "r", "item_id": "r.0", "error_code": "http-404"})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("boom", extra={"event_id": "ev1"})
    plain, failed, boom = _json_lines(capsys.readouterr().err)
    assert set(plain) == {"time", "level", "logger", "message"}
    assert plain["message"] == "plain 1" and plain["level"] == "DEBUG"
    assert plain["logger"] == "csvimg.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", plain["time"])
    assert failed == {**failed, "level": "WARNING", "message": "item r.0 failed",
                      "request_id": "r", "item_id": "r.0", "error_code": "http-404"}
    assert boom["event_id"] == "ev1"
    assert "ZeroDivisionError" in boom["exception"] and "Traceback" in boom["exception"]


def test_text_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    logging.getLogger("csvimg.test").debug("hidden")
    logging.getLogger("csvimg.test").info("shown %s", "here")
    [line] = capsys.readouterr().err.splitlines()
    assert TEXT_LINE.match(line) and line.endswith("csvimg.test: shown here")


def test_configure_logging_replaces_only_its_own_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    configure_logging("info", "json")
    configure_logging("warning", "text")
    assert foreign in root.handlers
    assert root.level == logging.WARNING
    assert logging.getLogger("httpx").level == logging.WARNING
    logging.getLogger("csvimg.test").warning("once")
    assert len(capsys.readouterr().err.splitlines()) == 1  # one handler, not two


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "text"), ("info", "xml")])
def test_configure_logging_refuses_unknown_values(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        configure_logging(level, fmt)


# ------------------------------------------------------------------ the flow


def _run_flow(host: ImageHost) -> dict[str, Any]:
    """A whole flow with every kind of secret in play; returns them and the ids."""
    key_a, key_b, wrong = (secrets.token_urlsafe(24) for _ in range(3))
    url_password, url_token = secrets.token_hex(12), secrets.token_hex(12)
    host.add("/hook", status=204)
    settings = Settings(
        fetch=FetchPolicy(allow=parse_allow(host.allow), retries=0),
        outbox_interval=0.1,
        webhook_schedule=(0.2, 0.2),
    )
    app = create_app(settings, workers=1, shutdown_grace=0.05,
                     api_keys=f"alice:{key_a},{key_b}")
    out: dict[str, Any] = {"keys": [key_a, key_b, wrong], "webhook_secret": settings.webhook_secret}
    callback = host.url("/hook").replace("://", f"://cb:{url_password}@") + f"?token={url_token}"
    with ThreadServer(app) as srv, httpx.Client(timeout=10) as anon, \
            httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key_a}"}) as alice:
        assert anon.get(srv.url + "/api/v1/webhook",
                        headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        registered = alice.post(srv.url + "/api/v1/webhook", json={"callback_url": callback})
        assert registered.status_code == 200, registered.text
        body = make_csv([
            ["1", "A", host.url("/a.jpg") + f"?token={url_token}"],
            ["2", "B", host.url("/gone.jpg").replace("://", f"://u:{url_password}@")
             + f"?sig={url_token}"],
        ])
        uploaded = alice.post(srv.url + "/api/v1/upload",
                              files={"file": ("p.csv", body, "text/csv")},
                              data={"callback_url": callback})
        assert uploaded.status_code == 200, uploaded.text
        rid = uploaded.json()["request_id"]
        wait_finished(alice, srv.url, rid)
        wait_until(lambda: len(host.requests_to("/hook")) >= 2, what="both deliveries")
        # Third-party code logging carelessly is scrubbed as well.
        careless = logging.getLogger("thirdparty.client")
        careless.debug("GET %s with headers %s", callback, {"Authorization": f"Bearer {key_b}"})
        careless.info("config: keys=%s secret=%s", f"alice:{key_a}", registered.json()["secret"])
        try:
            raise ValueError(f"bad signature for {uploaded.json()['callback_secret']}")
        except ValueError:
            careless.exception("verification failed")
    out.update(
        request_id=rid,
        secrets=[key_a, key_b, wrong, url_password, url_token, settings.webhook_secret,
                 registered.json()["secret"], uploaded.json()["callback_secret"]],
    )
    return out


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_is_ever_logged(
    photo_host: ImageHost, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure_logging("debug", fmt)
    flow = _run_flow(photo_host)
    written = capsys.readouterr().err
    for secret in flow["secrets"]:
        assert secret not in written
    # The grep is meaningful: the flow was logged, secrets were met and masked.
    assert flow["request_id"] in written
    assert "verification failed" in written and "***" in written
    assert "API keys on: 2 key(s), owners alice, key-" in written
    if fmt == "json":
        _json_lines(written)
    else:
        assert all(TEXT_LINE.match(line) for line in written.splitlines()
                   if line and not line.startswith((" ", "Traceback", "ValueError")))


def test_json_flow_lines_carry_ids(
    photo_host: ImageHost, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug", "json")
    flow = _run_flow(photo_host)
    lines = _json_lines(capsys.readouterr().err)
    rid = flow["request_id"]
    mine = [line for line in lines if line.get("request_id") == rid]
    messages = [line["message"] for line in mine]
    assert any(m.startswith(f"request {rid} accepted") for m in messages)
    assert any(m.startswith("upload accepted") and line.get("owner") == "alice"
               for m, line in zip(messages, mine, strict=True))
    assert any(m.startswith(f"request {rid} COMPLETED") for m in messages)
    [failed] = [line for line in mine if line.get("error_code") == "http-404"]
    assert failed["item_id"] == f"{rid}.1" and failed["level"] == "WARNING"
    [done] = [line for line in mine if line["message"].endswith("done")
              and line.get("item_id") == f"{rid}.0"]
    assert done["level"] == "DEBUG"
    deliveries = [line for line in mine if line.get("event_id")]
    assert deliveries and all(line["logger"] == "csvimg.webhooks" for line in deliveries)
