"""The HTTP API through a real uvicorn server (in a background thread).

Every status code of the API has a test here; the OpenAPI document is
checked against the app's routes and against real responses. The
subprocess tests (``csvimg serve`` end to end, kill -9, ``csvimg worker``)
are in ``test_server_process.py``.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import select
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.routing import Mount, Route

import images
from csvimg.backends import BlobInfo
from csvimg.backends.memory import MemoryBlobStore
from csvimg.engine import Engine
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.manifest import ManifestLimits
from csvimg.settings import Settings
from csvimg_server import create_app
from csvimg_server.openapi import OPENAPI
from server_helpers import (
    ThreadServer,
    all_items,
    check_response,
    make_csv,
    photo_host,
    photo_jpeg,
    shared_photo_host,
    validate,
    wait_finished,
    wait_until,
)
from servers import ImageHost

__all__ = ["photo_host", "shared_photo_host"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(60)

UPLOAD = "/api/v1/upload"


def _settings(host: ImageHost, **changes: Any) -> Settings:
    return Settings(
        fetch=FetchPolicy(allow=parse_allow(host.allow), retries=0),
        outbox_interval=0.1,
        webhook_schedule=(0.2, 0.2),
        **changes,
    )


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture
def server(photo_host: ImageHost) -> Iterator[ThreadServer]:
    """The API with one in-process worker on memory backends."""
    app = create_app(_settings(photo_host), workers=1, shutdown_grace=0.05)
    with ThreadServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def shared(shared_photo_host: ImageHost) -> Iterator[ThreadServer]:
    """One API server for the module's tests that only look at answers."""
    app = create_app(_settings(shared_photo_host), workers=1, shutdown_grace=0.05)
    with ThreadServer(app) as srv:
        yield srv


def _count_requests(srv: ThreadServer) -> int:
    return len(srv.call(lambda: _engine(srv).storage.list_requests(limit=10_000)))


def _engine(srv: ThreadServer) -> Engine:
    engine: Engine = srv.app.state.engine
    return engine


def _upload(
    client: httpx.Client, base: str, body: bytes, filename: str = "products.csv", **fields: str
) -> httpx.Response:
    return client.post(
        base + UPLOAD, files={"file": (filename, body, "text/csv")}, data=fields or None
    )


def _rows(host: ImageHost) -> list[list[str]]:
    return [
        ["1", "Shirt", f"{host.url('/a.jpg')},{host.url('/b.jpg')}"],
        ["2", "Mug", f"{host.url('/c.png')},{host.url('/missing.jpg')},{host.url('/d.jpg')}"],
        ["3", "=HYPERLINK(\"x\")", host.url("/a.jpg")],
    ]


# ----------------------------------------------------------------- the flow


def test_upload_to_output_in_process(
    server: ThreadServer, photo_host: ImageHost, client: httpx.Client
) -> None:
    base = server.url
    response = _upload(client, base, make_csv(_rows(photo_host)))
    assert response.status_code == 200, response.text
    check_response(OPENAPI, UPLOAD, "POST", response)
    body = response.json()
    request_id = body["request_id"]
    assert body["status_url"] == f"{base}/api/v1/status/{request_id}"

    status = wait_finished(client, base, request_id)
    assert status["status"] == "COMPLETED"
    assert status["progress"] == {"total": 6, "done": 5, "failed": 1}
    assert status["created_at"].endswith("Z") and status["updated_at"] >= status["created_at"]
    assert status["output_csv_url"] == f"{base}/api/v1/requests/{request_id}/output.csv"
    check_response(
        OPENAPI, "/api/v1/status/{request_id}", "GET",
        client.get(f"{base}/api/v1/status/{request_id}"),
    )

    items = all_items(client, base, request_id)
    assert [(i["row"], i["position"]) for i in items] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2),
                                                          (2, 0)]
    failed = items[3]
    assert failed["status"] == "FAILED" and failed["error_code"] == "http-404"
    assert failed["output_url"] is None and failed["error_message"]
    for item in items[:3] + items[4:]:
        assert item["status"] == "DONE"
        assert item["output_url"].startswith(f"{base}/api/v1/images/{request_id}/")
        assert item["bytes_out"] < item["bytes_in"]
    check_response(
        OPENAPI, "/api/v1/requests/{request_id}/items", "GET",
        client.get(f"{base}/api/v1/requests/{request_id}/items"),
    )

    output = client.get(status["output_csv_url"])
    assert output.status_code == 200
    assert output.headers["content-type"] == "text/csv; charset=utf-8"
    assert output.headers["content-disposition"] == 'attachment; filename="products-output.csv"'
    rows = list(csv.reader(io.StringIO(output.text)))
    assert rows[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert rows[3][1] == "'=HYPERLINK(\"x\")"  # formula injection neutralised
    assert rows[1][3].split(",") == [items[0]["output_url"], items[1]["output_url"]]
    assert rows[2][3].split(",") == [items[2]["output_url"], "", items[4]["output_url"]]

    for item in items:
        if item["output_url"] is None:
            continue
        image = client.get(item["output_url"])
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/jpeg"
        assert image.headers["cache-control"] == "public, max-age=31536000, immutable"
        etag = image.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"')
        with Image.open(io.BytesIO(image.content)) as im:
            assert im.format == "JPEG"
            assert im.size == (item["width"], item["height"])
        again = client.get(item["output_url"], headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        weak = client.get(item["output_url"], headers={"If-None-Match": f'"x", W/{etag}'})
        assert weak.status_code == 304
        head = client.head(item["output_url"])
        assert head.status_code == 200 and head.headers["etag"] == etag
        check_response(OPENAPI, "/api/v1/images/{key}", "GET", image)
        check_response(OPENAPI, "/api/v1/images/{key}", "GET", again)


def test_public_url_makes_every_url_absolute_there(
    photo_host: ImageHost, client: httpx.Client
) -> None:
    public = "https://img.example.com/base"
    app = create_app(_settings(photo_host, public_url=public + "/"), workers=1,
                     shutdown_grace=0.05)
    with ThreadServer(app) as srv:
        response = _upload(client, srv.url, make_csv([["1", "A", photo_host.url("/a.jpg")]]))
        request_id = response.json()["request_id"]
        assert response.json()["status_url"] == f"{public}/api/v1/status/{request_id}"
        status = wait_finished(client, srv.url, request_id)
        assert status["output_csv_url"] == f"{public}/api/v1/requests/{request_id}/output.csv"
        [item] = all_items(client, srv.url, request_id)
        assert item["output_url"].startswith(f"{public}/api/v1/images/{request_id}/")
        output = client.get(f"{srv.url}/api/v1/requests/{request_id}/output.csv")
        assert f"{public}/api/v1/images/{request_id}/" in output.text


def test_items_pagination(server: ThreadServer, photo_host: ImageHost,
                          client: httpx.Client) -> None:
    rows = [[str(n), f"P{n}", photo_host.url("/a.jpg")] for n in range(5)]
    request_id = _upload(client, server.url, make_csv(rows)).json()["request_id"]
    url = f"{server.url}/api/v1/requests/{request_id}/items"
    page = client.get(url, params={"limit": 2}).json()
    assert (page["offset"], page["limit"], page["total"], len(page["items"])) == (0, 2, 5, 2)
    assert page["next"] == f"{url}?offset=2&limit=2"
    last = client.get(url, params={"offset": 4, "limit": 2}).json()
    assert len(last["items"]) == 1 and last["next"] is None
    assert client.get(url, params={"offset": 10}).json()["items"] == []
    for params in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"offset": -1},
                   {"offset": "1.5"}):
        bad = client.get(url, params=params)
        assert bad.status_code == 400, params
        assert "error" in bad.json()
        check_response(OPENAPI, "/api/v1/requests/{request_id}/items", "GET", bad)


# ------------------------------------------------------------------ OpenAPI


def _template(route: Route) -> str:
    return route.path.replace("{key:path}", "{key}")


def test_openapi_documents_every_route(shared: ThreadServer, client: httpx.Client) -> None:
    server = shared
    response = client.get(server.url + "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert document["servers"] == [{"url": server.url}]
    served: set[tuple[str, str]] = set()
    for route in server.app.routes:
        if isinstance(route, Mount):  # /static: the upload page's assets, not API
            continue
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((_template(route), method.lower()))
    documented = {
        (path, method) for path, ops in document["paths"].items() for method in ops
    }
    assert served == documented
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (path, method)
            assert op.get("summary"), (path, method)
            for name in [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]:
                assert "{" + name + "}" in path
    # Every $ref resolves.
    validate({"error": "x"}, {"$ref": "#/components/schemas/Error"}, document)
    text = response.text
    for ref in {part.split('"')[0] for part in text.split('"$ref":"')[1:]}:
        name = ref.rsplit("/", 1)[-1]
        assert name in document["components"]["schemas"], ref


# --------------------------------------------------------------------- 400


@pytest.mark.parametrize(
    ("body", "codes"),
    [
        (b"", {"empty-file"}),
        (b"a,b\n1,2\n", {"missing-column"}),
        (make_csv([["1", "A", "ftp://x/a.jpg"], ["1", "B", "not a url"]]),
         {"bad-scheme", "duplicate-serial", "bad-url"}),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", {"not-csv"}),
    ],
)
def test_invalid_csv_is_400_with_every_problem(
    shared: ThreadServer, client: httpx.Client, body: bytes, codes: set[str]
) -> None:
    before = _count_requests(shared)
    response = _upload(client, shared.url, body)
    assert response.status_code == 400
    check_response(OPENAPI, UPLOAD, "POST", response)
    data = response.json()
    assert set(data) == {"error", "errors"} and data["error"]
    assert {e["code"] for e in data["errors"]} == codes
    for problem in data["errors"]:
        assert set(problem) == {"row", "column", "code", "message"}
    assert _count_requests(shared) == before


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("multipart/form-data; boundary=b0undary",
         _multipart([("callback_url", None, b"https://example.com/")]), "'file'"),
        ("multipart/form-data; boundary=b0undary", b"--b0undary--\r\n", "'file'"),
        ("text/csv", b"S. No.,Product Name,Input Image Urls\n", "multipart/form-data"),
        ("application/json", b'{"file": "x"}', "multipart/form-data"),
        (None, b"", "multipart/form-data"),
        ("multipart/form-data", b"x", "boundary"),
        ("multipart/form-data; boundary=b0undary", b"garbage", "malformed"),
        ("multipart/form-data; boundary=b0undary",
         b'--b0undary\r\nContent-Disposition: form-data; name="file"\r\n\r\n1,2', "ended"),
        ("multipart/form-data; boundary=b0undary",
         _multipart([("file", "a.csv", b"x"), ("file", "b.csv", b"y")]), "more than one"),
        ("multipart/form-data; boundary=b0undary",
         _multipart([("file", "a.csv", b"x"), ("colour", None, b"red")]), "unknown form field"),
        ("multipart/form-data; boundary=b0undary",
         _multipart([("file", "a.csv", b"x"), ("quality", None, b"9" * 9000)]), "longer"),
    ],
)
def test_bad_form_is_400(
    shared: ThreadServer, client: httpx.Client, content_type: str | None, body: bytes,
    message: str,
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post(shared.url + UPLOAD, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    check_response(OPENAPI, UPLOAD, "POST", response)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"callback_url": "ftp://example.com/hook"}, "bad-scheme"),
        ({"callback_url": "not a url"}, "callback_url"),
        ({"callback_url": "http://10.1.2.3/hook"}, "blocked-address"),
        ({"callback_url": "http://169.254.169.254/latest"}, "blocked-address"),
        ({"quality": "0"}, "quality"),
        ({"quality": "101"}, "quality"),
        ({"quality": "high"}, "quality"),
        ({"format": "BMP"}, "format"),
        ({"max_dimension": "-5"}, "max_dimension"),
        ({"max_dimension": "big"}, "max_dimension"),
    ],
)
def test_bad_callback_or_options_is_400(
    shared: ThreadServer, shared_photo_host: ImageHost, client: httpx.Client,
    fields: dict[str, str], message: str,
) -> None:
    before = _count_requests(shared)
    body = make_csv([["1", "A", shared_photo_host.url("/a.jpg")]])
    response = _upload(client, shared.url, body, **fields)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert _count_requests(shared) == before


def test_options_and_callback_are_stored(
    server: ThreadServer, photo_host: ImageHost, client: httpx.Client
) -> None:
    photo_host.add("/hook", status=204)
    body = make_csv([["1", "A", photo_host.url("/d.jpg")]])
    response = _upload(client, server.url, body, quality="80", format="jpg",
                       max_dimension="100", callback_url=photo_host.url("/hook"))
    assert response.status_code == 200, response.text
    data = response.json()
    secret = data["callback_secret"]
    assert secret.startswith("whsec_")
    check_response(OPENAPI, UPLOAD, "POST", response)
    request = server.call(lambda: _engine(server).get_request(data["request_id"]))
    assert request.callback_url == photo_host.url("/hook")
    assert (request.options.quality, request.options.format,
            request.options.max_dimension) == (80, "JPEG", 100)
    wait_finished(client, server.url, data["request_id"])
    [item] = all_items(client, server.url, data["request_id"])
    assert max(item["width"], item["height"]) == 100
    # The callback receiver gets the event, signed with that secret.
    wait_until(lambda: bool(photo_host.requests_to("/hook")), what="the callback")
    [delivery] = photo_host.requests_to("/hook")
    from standardwebhooks import Webhook as Verifier

    payload = Verifier(secret).verify(delivery.body, {k: v for k, v in delivery.headers})
    assert payload["data"]["request_id"] == data["request_id"]


# --------------------------------------------------------------------- 413


@pytest.fixture
def small_server(photo_host: ImageHost) -> Iterator[ThreadServer]:
    """The API with a 10 kB upload limit (and no workers)."""
    settings = _settings(photo_host, manifest=ManifestLimits(max_bytes=10_000))
    with ThreadServer(create_app(settings, workers=0)) as srv:
        yield srv


def _read_response(sock: socket.socket, timeout: float = 5) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


_FILE_HEAD = (b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
              b"Content-Type: text/csv\r\n\r\n")


def test_413_at_once_on_content_length(small_server: ThreadServer) -> None:
    """A declared length over the limit is refused before any body byte is read."""
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /api/v1/upload HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n"
            b"Content-Length: 50000000\r\n\r\n" + _FILE_HEAD
        )
        status, body = _read_response(sock)
        assert status == 413
        assert time.monotonic() - started < 2  # did not wait for 50 MB
        assert sock.recv(1) == b""  # and closed: no point in receiving it
        assert b'"error"' in body and b"10000" in body


def test_413_while_streaming_chunked(small_server: ThreadServer) -> None:
    """Without Content-Length the body is counted as it arrives and cut off."""
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        sock.sendall(
            b"POST /api/v1/upload HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(_FILE_HEAD), _FILE_HEAD)
        )
        sent = 0
        chunk = b"1,a,https://example.com/a.jpg\n" * 100
        # Keep sending until the server answers: it must do so soon after
        # the limit, long before the 10 MB this loop would send.
        while sent < 10_000_000:
            readable, _, _ = select.select([sock], [], [], 0.005)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            sent += len(chunk)
        status, body = _read_response(sock)
    assert status == 413
    assert sent < 10_000 + 70_000 + 200_000  # a few socket buffers past the limit at most
    assert b"10000" in body
    engine = _engine(small_server)
    assert small_server.call(lambda: engine.storage.list_requests()) == []


def test_413_with_a_normal_client(small_server: ThreadServer, client: httpx.Client) -> None:
    response = _upload(client, small_server.url, b"x" * 200_000)
    assert response.status_code == 413
    check_response(OPENAPI, UPLOAD, "POST", response)
    # Just over the file limit, but within the body allowance: the file part
    # itself is counted too.
    response = _upload(client, small_server.url, b"x" * 10_001)
    assert response.status_code == 413
    # At the limit exactly it is accepted as far as size goes (then validated).
    body = make_csv([["1", "A", "https://example.com/a.jpg"]])
    response = _upload(client, small_server.url, body + b" " * (10_000 - len(body)))
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------- 404/405


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET *target* verbatim (clients would normalise ``..`` away)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        return _read_response(sock)


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/api/v1/status/not-a-uuid",
        "/api/v1/status/00000000-0000-4000-8000-000000000000",
        "/api/v1/status/" + "1" * 5000,
        "/api/v1/requests/00000000-0000-4000-8000-000000000000/items",
        "/api/v1/requests/00000000-0000-4000-8000-000000000000/output.csv",
        "/api/v1/requests/00000000-0000-4000-8000-000000000000/deliveries",
        "/api/v1/requests/x'; DROP TABLE items;--/items",
        "/api/v1/images/00000000-0000-4000-8000-000000000000/0.jpg",
        "/api/v1/images/",
    ],
)
def test_404_is_json(shared: ThreadServer, client: httpx.Client, path: str) -> None:
    response = client.get(shared.url + path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/images/../../../../etc/passwd",
        "/api/v1/images/%2e%2e/%2e%2e/etc/passwd",
        "/api/v1/images/a/..%2f..%2f..%2fetc%2fpasswd",
        "/api/v1/images//etc/passwd",
        "/api/v1/images/a%5c..%5c..%5cx",
        "/api/v1/images/a%00.jpg",
    ],
)
def test_hostile_image_keys_are_404(tmp_path: Path, target: str) -> None:
    settings = Settings(blobs_url=f"file://{tmp_path / 'images'}")
    with ThreadServer(create_app(settings, workers=0)) as srv:
        status, body = _raw_get(srv.port, target)
    assert (status, body) == (404, b'{"error":"no such image"}')


def test_file_blobs_are_sent_from_disk(tmp_path: Path, client: httpx.Client) -> None:
    settings = Settings(blobs_url=f"file://{tmp_path / 'images'}")
    data = photo_jpeg(64, 48)
    with ThreadServer(create_app(settings, workers=0)) as srv:
        blobs = _engine(srv).blobs
        info = srv.call(lambda: blobs.put("r/0.jpg", data, content_type="image/jpeg"))
        assert info.path is not None  # so the server may hand the file over
        url = srv.url + "/api/v1/images/r/0.jpg"
        response = client.get(url)
        assert response.status_code == 200 and response.content == data
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["etag"] == f'"{info.etag}"'
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert client.get(url, headers={"If-None-Match": f'"{info.etag}"'}).status_code == 304
        assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
        part = client.get(url, headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == data[:10]


def test_405_is_json_with_allow(shared: ThreadServer, client: httpx.Client) -> None:
    for method, path, allow in [
        ("GET", UPLOAD, "POST"),
        ("PUT", "/healthz", "GET, HEAD"),
        ("DELETE", "/api/v1/status/00000000-0000-4000-8000-000000000000", "GET, HEAD"),
        ("PATCH", "/api/v1/webhook", None),
    ]:
        response = client.request(method, shared.url + path)
        assert response.status_code == 405, (method, path)
        assert response.json() == {"error": "method not allowed"}
        if allow is not None:
            assert set(response.headers["allow"].split(", ")) == set(allow.split(", "))


# --------------------------------------------------------------------- 409


def test_output_is_409_while_running(photo_host: ImageHost, client: httpx.Client) -> None:
    photo_host.add("/slow.jpg", images.photo_jpeg(64, 64), content_type="image/jpeg", delay=3)
    app = create_app(_settings(photo_host), workers=1, shutdown_grace=0.05)
    with ThreadServer(app) as srv:
        body = make_csv([["1", "A", photo_host.url("/slow.jpg")]])
        request_id = _upload(client, srv.url, body).json()["request_id"]
        response = client.get(f"{srv.url}/api/v1/requests/{request_id}/output.csv")
        assert response.status_code == 409
        data = response.json()
        assert data["status"] in ("PENDING", "PROCESSING")
        assert "not ready" in data["error"]
        check_response(OPENAPI, "/api/v1/requests/{request_id}/output.csv", "GET", response)
        status = client.get(f"{srv.url}/api/v1/status/{request_id}").json()
        assert status["output_csv_url"] is None


# --------------------------------------------------------------------- 500


def test_database_failure_is_500_and_nothing_half_written(
    tmp_path: Path, photo_host: ImageHost, client: httpx.Client
) -> None:
    db = tmp_path / "csvimg.db"
    settings = _settings(photo_host, storage_url=f"sqlite:///{db}", blobs_url="memory://")
    with ThreadServer(create_app(settings, workers=0)) as srv:
        ok = _upload(client, srv.url, make_csv([["1", "A", photo_host.url("/a.jpg")]]))
        assert ok.status_code == 200
        # A real failure half-way through the transaction: the request row
        # is inserted, then the items table is gone.
        with sqlite3.connect(db) as conn:
            conn.execute("ALTER TABLE items RENAME TO items_gone")
        response = _upload(client, srv.url, make_csv([["1", "A", photo_host.url("/b.jpg")],
                                                      ["2", "B", photo_host.url("/c.png")]]))
        assert response.status_code == 500
        assert response.json()["error"].startswith("database error: ")
        check_response(OPENAPI, UPLOAD, "POST", response)
        with sqlite3.connect(db) as conn:
            requests = conn.execute("SELECT id FROM requests").fetchall()
            rows = conn.execute("SELECT count(*) FROM rows").fetchone()[0]
        assert requests == [(ok.json()["request_id"],)]
        assert rows == 1
        with sqlite3.connect(db) as conn:
            conn.execute("ALTER TABLE items_gone RENAME TO items")
        # And the API is fine again afterwards.
        again = _upload(client, srv.url, make_csv([["1", "A", photo_host.url("/b.jpg")]]))
        assert again.status_code == 200


class _BrokenBlobs(MemoryBlobStore):
    """A blob store with a bug (not a storage failure): stat raises."""

    async def stat(self, key: str) -> BlobInfo | None:
        raise ZeroDivisionError("a bug in a third-party backend")


def test_unexpected_error_is_500_internal_error_and_logged(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(Settings(), blobs=_BrokenBlobs())
    with ThreadServer(create_app(engine=engine, workers=0)) as srv, \
            caplog.at_level(logging.ERROR, logger="csvimg.server"):
        response = client.get(srv.url + "/api/v1/images/x/0.jpg")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error"}
    assert "Traceback" not in response.text
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


# --------------------------------------------------------------------- health


def test_healthz_and_readyz(tmp_path: Path, client: httpx.Client) -> None:
    settings = Settings(storage_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    with ThreadServer(create_app(settings, workers=0)) as srv:
        assert client.get(srv.url + "/healthz").json() == {"status": "ok"}
        ready = client.get(srv.url + "/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "checks": {"storage": "ok", "queue": "ok"}}
        check_response(OPENAPI, "/readyz", "GET", ready)
        storage = _engine(srv).storage
        srv.call(storage.close)  # the database goes away
        try:
            down = client.get(srv.url + "/readyz")
            assert down.status_code == 503
            assert down.json()["status"] == "unavailable"
            assert down.json()["checks"]["storage"].startswith("error: ")
            check_response(OPENAPI, "/readyz", "GET", down)
            assert client.get(srv.url + "/healthz").status_code == 200  # still alive
        finally:
            srv.call(storage.open)
        assert client.get(srv.url + "/readyz").status_code == 200


# ------------------------------------------------------------------- webhooks


def test_webhook_registration(server: ThreadServer, photo_host: ImageHost,
                              client: httpx.Client) -> None:
    url = server.url + "/api/v1/webhook"
    response = client.post(url, json={"callback_url": photo_host.url("/hook")})
    assert response.status_code == 200, response.text
    check_response(OPENAPI, "/api/v1/webhook", "POST", response)
    data = response.json()
    assert data["message"] == "Webhook registered successfully."
    assert data["id"].startswith("wh_")
    assert data["secret"].startswith("whsec_")
    assert len(base64.b64decode(data["secret"].removeprefix("whsec_"))) == 24

    listed = client.get(url)
    check_response(OPENAPI, "/api/v1/webhook", "GET", listed)
    [hook] = listed.json()["webhooks"]
    assert hook["id"] == data["id"] and hook["callback_url"] == photo_host.url("/hook")
    assert hook["active"] is True
    assert data["secret"] not in listed.text

    deleted = client.delete(f"{url}/{data['id']}")
    assert deleted.status_code == 200
    check_response(OPENAPI, "/api/v1/webhook/{webhook_id}", "DELETE", deleted)
    assert client.get(url).json() == {"webhooks": []}
    gone = client.delete(f"{url}/{data['id']}")
    assert gone.status_code == 404
    check_response(OPENAPI, "/api/v1/webhook/{webhook_id}", "DELETE", gone)
    assert client.delete(f"{url}/not-an-id").status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "JSON"),
        (b"[1, 2]", "callback_url"),
        (b"{}", "callback_url"),
        (b'{"callback_url": 5}', "callback_url"),
        (b'{"callback_url": ""}', "callback_url"),
        (b'{"callback_url": "ftp://example.com/x"}', "bad-scheme"),
        (b'{"callback_url": "javascript:alert(1)"}', "bad-scheme"),
        (b'{"callback_url": "http:///nohost"}', "bad-url"),
        (b'{"callback_url": "http://192.168.1.10/hook"}', "blocked-address"),
        (b'{"callback_url": "http://[::1]:8080/hook"}', "blocked-address"),
        (b'{"callback_url": "http://2130706433/hook"}', "blocked-address"),
        (b'{"callback_url": "http://localhost:1/hook"}', "blocked-address"),
    ],
)
def test_webhook_registration_400(
    shared: ThreadServer, client: httpx.Client, body: bytes, message: str
) -> None:
    response = client.post(shared.url + "/api/v1/webhook", content=body,
                           headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    check_response(OPENAPI, "/api/v1/webhook", "POST", response)
    assert client.get(shared.url + "/api/v1/webhook").json() == {"webhooks": []}


def test_webhook_body_too_large(shared: ThreadServer, client: httpx.Client) -> None:
    response = client.post(shared.url + "/api/v1/webhook", content=b"{" + b" " * 70_000 + b"}")
    assert response.status_code == 413


def test_deliveries_are_listed(server: ThreadServer, photo_host: ImageHost,
                               client: httpx.Client) -> None:
    photo_host.add("/hook", status=204)
    registered = client.post(server.url + "/api/v1/webhook",
                             json={"callback_url": photo_host.url("/hook")}).json()
    body = make_csv([["1", "A", photo_host.url("/a.jpg")]])
    request_id = _upload(client, server.url, body).json()["request_id"]
    wait_finished(client, server.url, request_id)
    url = f"{server.url}/api/v1/requests/{request_id}/deliveries"
    wait_until(lambda: bool(client.get(url).json()["deliveries"]), what="a delivery")
    response = client.get(url)
    check_response(OPENAPI, "/api/v1/requests/{request_id}/deliveries", "GET", response)
    [delivery] = response.json()["deliveries"]
    assert delivery["url"] == photo_host.url("/hook")
    assert delivery["status_code"] == 204 and delivery["error"] is None
    assert delivery["attempt"] == 1 and delivery["at"].endswith("Z")
    [sent] = photo_host.requests_to("/hook")
    assert sent.header("webhook-id") == delivery["event_id"]
    from standardwebhooks import Webhook as Verifier

    Verifier(registered["secret"]).verify(sent.body, dict(sent.headers))
