"""Optional API keys (``CSVIMG_API_KEYS``): 401s, public routes, owner isolation.

Parsing is tested directly; everything else through a real uvicorn with
two keys (``alice:<key>`` and a bare key), where each key must see only
its own requests, items, output CSV, deliveries, images and webhooks, and
a webhook registered under one key must never fire for the other's
requests (checked with a real receiver).
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from csvimg._errors import ConfigError
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.settings import Settings
from csvimg_server import create_app
from csvimg_server.auth import ApiKeys, is_public
from csvimg_server.openapi import OPENAPI
from server_helpers import (
    ThreadServer,
    all_items,
    check_response,
    make_csv,
    shared_photo_host,
    wait_finished,
    wait_until,
)
from servers import ImageHost

__all__ = ["shared_photo_host"]  # fixture, imported for pytest

pytestmark = pytest.mark.timeout(60)

KEY_A = secrets.token_urlsafe(24)
KEY_B = secrets.token_urlsafe(24)
KEYS = f"alice:{KEY_A}, {KEY_B}"
OWNER_B = "key-" + hashlib.sha256(KEY_B.encode()).hexdigest()[:12]
UNKNOWN = "00000000-0000-4000-8000-000000000000"

# Every protected operation: (method, path); ids are filled in as needed.
PROTECTED = [
    ("POST", "/api/v1/upload", "/api/v1/upload"),
    ("GET", f"/api/v1/status/{UNKNOWN}", "/api/v1/status/{request_id}"),
    ("GET", f"/api/v1/requests/{UNKNOWN}/items", "/api/v1/requests/{request_id}/items"),
    ("GET", f"/api/v1/requests/{UNKNOWN}/output.csv", "/api/v1/requests/{request_id}/output.csv"),
    ("GET", f"/api/v1/requests/{UNKNOWN}/deliveries", "/api/v1/requests/{request_id}/deliveries"),
    ("GET", f"/api/v1/images/{UNKNOWN}/0.jpg", "/api/v1/images/{key}"),
    ("POST", "/api/v1/webhook", "/api/v1/webhook"),
    ("GET", "/api/v1/webhook", "/api/v1/webhook"),
    ("DELETE", "/api/v1/webhook/wh_0123", "/api/v1/webhook/{webhook_id}"),
]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ parsing


def test_parse_named_and_bare_keys() -> None:
    keys = ApiKeys.parse(KEYS)
    assert keys is not None and len(keys) == 2
    assert keys.owners == {"alice", OWNER_B}
    assert keys.owner(KEY_A) == "alice"
    assert keys.owner(KEY_B) == OWNER_B
    assert KEY_B not in OWNER_B  # the owner id of a bare key is a hash, never the key
    for wrong in ("", KEY_A[:-1], KEY_A + "x", "alice", f"alice:{KEY_A}", KEY_A.upper()):
        assert keys.owner(wrong) is None
    assert KEY_A not in repr(keys) and KEY_B not in repr(keys)
    assert set(keys.secrets()) == {KEY_A, KEY_B}


def test_several_keys_may_share_an_owner() -> None:
    """Key rotation: old and new key both work and see the same requests."""
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    keys = ApiKeys.parse(f"ops:{old},ops:{new}")
    assert keys is not None
    assert keys.owner(old) == keys.owner(new) == "ops"


@pytest.mark.parametrize("value", ["", "   ", None])
def test_blank_or_unset_means_off(value: str | None) -> None:
    env = {} if value is None else {"CSVIMG_API_KEYS": value}
    assert ApiKeys.from_env(env) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (",, ,", "holds no key"),
        ("short-key", "16 to 512"),
        ("alice:short", "16 to 512"),
        ("alice:" + "k" * 513, "16 to 512"),
        ("has space" + "k" * 16, "16 to 512"),
        (":" + "k" * 20, "name"),
        ("bad name:" + "k" * 20, "name"),
        ("a:b:" + "k" * 20, "name"),
        (f"x:{KEY_A},y:{KEY_A}", "twice"),
    ],
)
def test_malformed_keys_are_refused_without_quoting_them(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        ApiKeys.parse(value)
    for part in value.replace(":", ",").split(","):
        if len(part.strip()) >= 5:  # names and keys alike stay out of the message
            assert part.strip() not in str(info.value)


def test_public_paths() -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/static/app.js"):
        assert is_public(path), path
    for path in ("/api/v1/upload", "/static", "/healthz/x", "/metricsx", "/nope"):
        assert not is_public(path), path


# ------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def receiver() -> Iterator[ImageHost]:
    """A webhook receiver: /hook-a and /hook-b answer 204."""
    with ImageHost() as host:
        host.add("/hook-a", status=204)
        host.add("/hook-b", status=204)
        yield host


@pytest.fixture(scope="module")
def server(shared_photo_host: ImageHost, receiver: ImageHost) -> Iterator[ThreadServer]:
    """The API with keys ``alice:KEY_A`` and bare ``KEY_B``, one worker."""
    settings = Settings(
        fetch=FetchPolicy(allow=parse_allow(f"{shared_photo_host.allow},{receiver.allow}"),
                          retries=0),
        outbox_interval=0.1,
        webhook_schedule=(0.2, 0.2),
    )
    app = create_app(settings, workers=1, shutdown_grace=0.05, api_keys=KEYS)
    with ThreadServer(app) as srv:
        yield srv


@pytest.fixture
def anon() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture
def alice() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, headers=_auth(KEY_A)) as c:
        yield c


@pytest.fixture
def bob() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, headers=_auth(KEY_B)) as c:
        yield c


def _upload(client: httpx.Client, base: str, body: bytes) -> httpx.Response:
    return client.post(base + "/api/v1/upload", files={"file": ("p.csv", body, "text/csv")})


@pytest.mark.parametrize(("method", "path", "template"), PROTECTED)
def test_protected_routes_need_a_valid_key(
    server: ThreadServer, anon: httpx.Client, method: str, path: str, template: str
) -> None:
    for headers, invalid in [
        ({}, False),
        (_auth("wrong-" + KEY_A), True),
        ({"Authorization": f"Basic {KEY_A}"}, False),
        ({"Authorization": "Bearer"}, False),
        ({"Authorization": f"Bearer{KEY_A}"}, False),
    ]:
        response = anon.request(method, server.url + path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="csvimg"')
        assert ('error="invalid_token"' in challenge) is invalid
        check_response(OPENAPI, template, method, response)
    # The scheme is case-insensitive and the key works: past the auth check.
    response = anon.request(method, server.url + path, headers={"Authorization": f"bearer {KEY_A}"})
    assert response.status_code != 401


def test_unknown_paths_are_401_too(server: ThreadServer, anon: httpx.Client) -> None:
    assert anon.get(server.url + "/api/v2/secret-admin").status_code == 401
    assert anon.get(server.url + "/api/v2/secret-admin", headers=_auth(KEY_A)).status_code == 404


def test_public_routes_are_open(server: ThreadServer, anon: httpx.Client) -> None:
    assert anon.get(server.url + "/healthz").json() == {"status": "ok"}
    assert anon.get(server.url + "/readyz").status_code == 200
    assert anon.head(server.url + "/healthz").status_code == 200
    assert anon.get(server.url + "/metrics").status_code == 200
    document = anon.get(server.url + "/openapi.json")
    assert document.status_code == 200
    # A server with keys says so: the bearer key is required, not optional.
    assert document.json()["security"] == [{"apiKey": []}]
    assert document.json()["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert document.json()["paths"]["/healthz"]["get"]["security"] == []
    # The upload page and its static files load without a key (the page asks for one).
    assert anon.get(server.url + "/").status_code == 200
    assert anon.get(server.url + "/static/app.js").status_code == 200


def test_a_large_anonymous_upload_is_refused_at_once(server: ThreadServer) -> None:
    """No key: 401 before a byte of the body is read, and the connection is closed."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        started = time.monotonic()
        sock.sendall(b"POST /api/v1/upload HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: multipart/form-data; boundary=xx\r\n"
                     b"Content-Length: 500000000\r\n\r\n--xx\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" in data.lower()
    assert time.monotonic() - started < 3


def _not_found(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 404, response.text
    body: dict[str, Any] = response.json()
    return body


def test_requests_are_visible_only_to_their_owner(
    server: ThreadServer, shared_photo_host: ImageHost, alice: httpx.Client, bob: httpx.Client,
    anon: httpx.Client,
) -> None:
    base = server.url
    csv_body = make_csv([["1", "A", shared_photo_host.url("/a.jpg")],
                         ["2", "B", shared_photo_host.url("/missing.jpg")]])
    uploaded = _upload(alice, base, csv_body)
    assert uploaded.status_code == 200, uploaded.text
    rid = uploaded.json()["request_id"]
    wait_finished(alice, base, rid)
    request = server.call(lambda: server.app.state.engine.get_request(rid))
    assert request.owner == "alice"

    [done, _failed] = all_items(alice, base, rid)
    image_url = done["output_url"]
    assert alice.get(f"{base}/api/v1/requests/{rid}/output.csv").status_code == 200
    assert alice.get(f"{base}/api/v1/requests/{rid}/deliveries").status_code == 200
    image = alice.get(image_url)
    assert image.status_code == 200
    # Never stored by a shared cache, which could hand it to another key.
    assert image.headers["cache-control"] == "private, max-age=31536000, immutable"

    # The other key: exactly the answers of an unknown id, so nothing leaks.
    for path in ("/api/v1/status/{}", "/api/v1/requests/{}/items",
                 "/api/v1/requests/{}/output.csv", "/api/v1/requests/{}/deliveries"):
        theirs = _not_found(bob.get(base + path.format(rid)))
        unknown = _not_found(bob.get(base + path.format(UNKNOWN)))
        assert theirs == {"error": f"no request {rid!r}"}
        assert unknown == {"error": f"no request {UNKNOWN!r}"}
    etag = image.headers["etag"]
    assert _not_found(bob.get(image_url)) == {"error": "no such image"}
    assert bob.get(image_url, headers={"If-None-Match": etag}).status_code == 404  # not 304
    assert anon.get(image_url).status_code == 401
    # Keys that do not start with a request id belong to nobody.
    assert alice.get(f"{base}/api/v1/images/not-a-request/0.jpg").status_code == 404

    # And bob's own request is his alone.
    mine = _upload(bob, base, make_csv([["1", "A", shared_photo_host.url("/b.jpg")]]))
    bob_rid = mine.json()["request_id"]
    wait_finished(bob, base, bob_rid)
    _not_found(alice.get(f"{base}/api/v1/status/{bob_rid}"))
    [bob_item] = all_items(bob, base, bob_rid)
    _not_found(alice.get(bob_item["output_url"]))
    assert bob.get(bob_item["output_url"]).status_code == 200


def test_webhooks_are_per_key(
    server: ThreadServer, shared_photo_host: ImageHost, receiver: ImageHost,
    alice: httpx.Client, bob: httpx.Client,
) -> None:
    base = server.url
    hooks = base + "/api/v1/webhook"
    hook_a = alice.post(hooks, json={"callback_url": receiver.url("/hook-a")}).json()
    hook_b = bob.post(hooks, json={"callback_url": receiver.url("/hook-b")}).json()
    assert [h["id"] for h in alice.get(hooks).json()["webhooks"]] == [hook_a["id"]]
    assert [h["id"] for h in bob.get(hooks).json()["webhooks"]] == [hook_b["id"]]

    # Deleting the other key's registration is "no such webhook"; it stays.
    assert alice.delete(f"{hooks}/{hook_b['id']}").status_code == 404
    assert [h["id"] for h in bob.get(hooks).json()["webhooks"]] == [hook_b["id"]]

    # Bob's request fires bob's hook only.
    bob_rid = _upload(bob, base, make_csv([["1", "A", shared_photo_host.url("/c.png")]])
                      ).json()["request_id"]
    wait_finished(bob, base, bob_rid)
    deliveries = f"{base}/api/v1/requests/{bob_rid}/deliveries"
    wait_until(lambda: bool(bob.get(deliveries).json()["deliveries"]), what="bob's delivery")
    [delivery] = bob.get(deliveries).json()["deliveries"]  # the round is over: one receiver
    assert delivery["url"] == receiver.url("/hook-b") and delivery["status_code"] == 204
    _not_found(alice.get(deliveries))
    sent_b = [r.json()["data"]["request_id"] for r in receiver.requests_to("/hook-b")]
    assert bob_rid in sent_b
    assert all(r.json()["data"]["request_id"] != bob_rid for r in receiver.requests_to("/hook-a"))

    # Alice's request fires alice's hook only.
    alice_rid = _upload(alice, base, make_csv([["1", "A", shared_photo_host.url("/d.jpg")]])
                        ).json()["request_id"]
    wait_finished(alice, base, alice_rid)
    wait_until(lambda: any(r.json()["data"]["request_id"] == alice_rid
                           for r in receiver.requests_to("/hook-a")), what="alice's delivery")
    alice_deliveries = alice.get(f"{base}/api/v1/requests/{alice_rid}/deliveries").json()
    assert [d["url"] for d in alice_deliveries["deliveries"]] == [receiver.url("/hook-a")]
    assert all(r.json()["data"]["request_id"] != alice_rid
               for r in receiver.requests_to("/hook-b"))

    # Each key deletes its own.
    assert bob.delete(f"{hooks}/{hook_b['id']}").status_code == 200
    assert alice.delete(f"{hooks}/{hook_a['id']}").status_code == 200
    assert alice.get(hooks).json() == bob.get(hooks).json() == {"webhooks": []}


# ---------------------------------------------------------- configuration


def test_the_environment_turns_keys_on(
    monkeypatch: pytest.MonkeyPatch, anon: httpx.Client
) -> None:
    key = secrets.token_urlsafe(20)
    monkeypatch.setenv("CSVIMG_API_KEYS", f"ci:{key}")
    with ThreadServer(create_app(Settings(), workers=0)) as srv:
        url = f"{srv.url}/api/v1/status/{uuid.uuid4()}"
        assert anon.get(url).status_code == 401
        assert anon.get(url, headers=_auth(key)).status_code == 404
    # api_keys=None overrides the environment: keys off, as by default.
    with ThreadServer(create_app(Settings(), workers=0, api_keys=None)) as srv:
        assert anon.get(f"{srv.url}/api/v1/status/{uuid.uuid4()}").status_code == 404
        assert anon.get(srv.url + "/openapi.json").json()["security"] == [{}, {"apiKey": []}]


def test_a_malformed_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSVIMG_API_KEYS", "alice:tooshort")
    with pytest.raises(ConfigError, match="CSVIMG_API_KEYS"):
        create_app(Settings(), workers=0)
