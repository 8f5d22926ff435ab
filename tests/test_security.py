"""Hostile input through the real server: SSRF, resource limits, CSV injection.

Each test drives the HTTP API of a real uvicorn (in a thread, or ``csvimg
serve`` in a subprocess when memory is measured) the way an attacker
would: a CSV of hostile image URLs, hostile webhook receivers, bodies
that never end, decompression bombs, ten million rows. The unit-level
proofs of the same rules live in ``test_fetch.py``, ``test_codec.py`` and
``test_manifest.py``; ``docs/security.md`` maps each promise to its test.

No test here may send a packet beyond the loopback interface: the
`tripwire` fixture sits under the fetcher's SSRF guard and fails any
connection to another address before it is made, and host names resolve
through a fake resolver (only ``localhost`` reaches the system's one, which
answers it from ``/etc/hosts``).
"""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohappyeyeballs import AddrInfoType

import images
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.fetch import _client as fetch_client
from csvimg.fetch import _resolve as fetch_resolve
from csvimg.settings import Settings
from csvimg_server import create_app
from server_helpers import (
    ServeProcess,
    ThreadServer,
    all_items,
    make_csv,
    wait_finished,
    wait_until,
)
from servers import ImageHost

pytestmark = pytest.mark.timeout(120)

UPLOAD = "/api/v1/upload"
WEBHOOK = "/api/v1/webhook"
JPEG = images.photo_jpeg(64, 48, metadata=False)
LOOPBACK = ("127.0.0.1", "::1")


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every TCP connection the fetcher opens; refuse any off loopback.

    It patches the socket layer *under* the SSRF guard, so an entry means
    the guard let a connection through, and a broken guard still cannot
    reach another machine: the attempt fails here (the item then fails
    with ``internal-error`` and the test's assertions say why).
    """
    seen: list[tuple[str, int]] = []
    original = fetch_client._open_socket

    def open_socket(addr_info: AddrInfoType) -> socket.socket:
        host, port = str(addr_info[4][0]), int(addr_info[4][1])
        seen.append((host, port))
        if host not in LOOPBACK:
            raise AssertionError(f"the SSRF guard let a connection to {host}:{port} through")
        return original(addr_info)

    monkeypatch.setattr(fetch_client, "_open_socket", open_socket)
    return seen


FAKE_DNS = {
    # A name of the attacker's that resolves to loopback.
    "loopback.test": ["127.0.0.1"],
    # DNS rebinding's friend: one public and one private answer.
    "mixed.test": ["93.184.216.34", "10.0.0.7"],
    # A name resolving to the cloud metadata address.
    "metadata.test": ["169.254.169.254"],
}


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve the made-up names of `FAKE_DNS`; never ask a real DNS server.

    ``localhost`` goes to the system resolver (``/etc/hosts``, no network);
    every other name is unknown.
    """
    system = fetch_resolve._system_resolve

    async def resolve(host: str, port: int) -> list[str]:
        name = host.lower().rstrip(".")
        if name == "localhost":
            return await system(name, port)
        if name in FAKE_DNS:
            return FAKE_DNS[name]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(fetch_resolve, "_system_resolve", resolve)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture
def allowed() -> Iterator[ImageHost]:
    """The one image host the server may fetch from (``127.0.0.1:PORT``)."""
    with ImageHost() as host:
        host.add("/a.jpg", JPEG, content_type="image/jpeg")
        yield host


@pytest.fixture
def forbidden() -> Iterator[ImageHost]:
    """A live loopback host that is *not* allowed, serving a real image.

    Fetching from it would succeed if the guard failed, so ``hits`` staying
    empty is the proof.
    """
    with ImageHost() as host:
        host.add("/a.jpg", JPEG, content_type="image/jpeg")
        host.add("/hook", status=204)
        yield host


def _settings(allow: str, **fetch: Any) -> Settings:
    policy: dict[str, Any] = {"allow": parse_allow(allow), "retries": 0}
    policy.update(fetch)
    return Settings(
        fetch=FetchPolicy(**policy), outbox_interval=0.05, webhook_schedule=(0.2, 0.2)
    )


@pytest.fixture
def server(allowed: ImageHost, tripwire: list[tuple[str, int]]) -> Iterator[ThreadServer]:
    """The API with one in-process worker; only `allowed` is on the allow-list."""
    with ThreadServer(create_app(_settings(allowed.allow), workers=1, shutdown_grace=0.05)) as srv:
        yield srv


def _upload(client: httpx.Client, base: str, body: bytes, **fields: str) -> httpx.Response:
    return client.post(base + UPLOAD, files={"file": ("p.csv", body, "text/csv")},
                       data=fields or None)


def _run(client: httpx.Client, base: str, urls: list[str]) -> list[dict[str, Any]]:
    """Upload one row per URL, wait for the end, return the items in order."""
    body = make_csv([[str(n), f"P{n}", url] for n, url in enumerate(urls, 1)])
    response = _upload(client, base, body)
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    wait_finished(client, base, request_id, timeout=30)
    items = all_items(client, base, request_id)
    assert [i["input_url"] for i in items] == urls
    return items


# --------------------------------------------------------------- SSRF table


def ssrf_table(forbidden_port: int) -> list[str]:
    """The issue's table; ``{o}`` is a live loopback port that is not allowed."""
    o = forbidden_port
    return [
        f"http://127.0.0.1:{o}/a.jpg",
        "http://127.0.0.1/a.jpg",
        f"http://localhost:{o}/a.jpg",
        f"http://LOCALHOST.:{o}/a.jpg",
        f"http://[::1]:{o}/a.jpg",
        f"http://0.0.0.0:{o}/a.jpg",  # Linux connects 0.0.0.0 to loopback
        "http://10.0.0.1/a.jpg",
        "http://172.16.0.1/a.jpg",
        "http://192.168.1.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/a.jpg",
        f"http://[::ffff:127.0.0.1]:{o}/a.jpg",
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
        "http://[fd00::1]/a.jpg",
        "http://2130706433/",
        f"http://2130706433:{o}/a.jpg",
        "http://0177.0.0.1/",
        f"http://0177.0.0.1:{o}/a.jpg",
        "http://0x7f.1/",
        f"http://0x7f.1:{o}/a.jpg",
        f"http://loopback.test:{o}/a.jpg",
        "http://mixed.test/a.jpg",
        "http://metadata.test/latest/meta-data/",
        f"https://user:secret@127.0.0.1:{o}/a.jpg?token=x",
    ]


def test_ssrf_image_urls_fail_with_blocked_address_before_connecting(
    server: ThreadServer,
    allowed: ImageHost,
    forbidden: ImageHost,
    tripwire: list[tuple[str, int]],
    client: httpx.Client,
) -> None:
    # An allowed host that redirects to private targets, hop by hop.
    allowed.redirect("/to-loopback", forbidden.url("/a.jpg"))
    allowed.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/")
    allowed.redirect("/to-private", "http://10.0.0.1/a.jpg")
    allowed.redirect("/to-numeric", f"http://2130706433:{forbidden.port}/a.jpg")
    hostile = [
        *ssrf_table(forbidden.port),
        allowed.url("/to-loopback"),
        allowed.url("/to-metadata"),
        allowed.url("/to-private"),
        allowed.url("/to-numeric"),
    ]
    started = time.monotonic()
    items = _run(client, server.url, [allowed.url("/a.jpg"), *hostile])
    elapsed = time.monotonic() - started

    good, *refused = items
    assert good["status"] == "DONE", good  # the allowed host and port work
    assert [(i["input_url"], i["error_code"]) for i in refused] == [
        (url, "blocked-address") for url in hostile
    ]
    assert all(i["attempts"] == 1 and i["status"] == "FAILED" for i in refused)
    assert all("CSVIMG_FETCH_ALLOW" in i["error_message"] for i in refused)
    # Credentials and query strings of a URL stay out of error messages.
    assert not any("secret" in i["error_message"] for i in refused)
    # Refused before connecting: only the allowed port was ever dialled...
    assert {port for _, port in tripwire} == {allowed.port}
    assert {host for host, _ in tripwire} <= set(LOOPBACK)
    # ...the live forbidden host saw nothing, and nothing waited for a timeout.
    assert forbidden.requests == []
    assert elapsed < 10


def test_ssrf_webhook_registration_is_refused(
    server: ThreadServer, allowed: ImageHost, forbidden: ImageHost, client: httpx.Client
) -> None:
    for url in ssrf_table(forbidden.port):
        response = client.post(server.url + WEBHOOK, json={"callback_url": url})
        assert response.status_code == 400, (url, response.text)
        assert response.headers["content-type"] == "application/json"
        assert "blocked-address" in response.json()["error"], url
    assert client.get(server.url + WEBHOOK).json() == {"webhooks": []}
    # Allowing 127.0.0.1:PORT allows that port and no other.
    ok = client.post(server.url + WEBHOOK, json={"callback_url": allowed.url("/hook")})
    assert ok.status_code == 200, ok.text
    assert forbidden.requests == []


def test_ssrf_upload_callback_url_is_refused(
    server: ThreadServer, allowed: ImageHost, forbidden: ImageHost, client: httpx.Client
) -> None:
    body = make_csv([["1", "A", allowed.url("/a.jpg")]])
    for url in ssrf_table(forbidden.port):
        response = _upload(client, server.url, body, callback_url=url)
        assert response.status_code == 400, (url, response.text)
        assert "blocked-address" in response.json()["error"], url
    engine = server.app.state.engine
    assert server.call(lambda: engine.storage.list_requests()) == []  # nothing stored
    assert forbidden.requests == []


def test_webhook_redirects_to_private_receivers_are_not_followed(
    server: ThreadServer,
    allowed: ImageHost,
    forbidden: ImageHost,
    tripwire: list[tuple[str, int]],
    client: httpx.Client,
) -> None:
    allowed.redirect("/hook", forbidden.url("/hook"), status=307)
    registered = client.post(server.url + WEBHOOK, json={"callback_url": allowed.url("/hook")})
    assert registered.status_code == 200
    response = _upload(client, server.url, make_csv([["1", "A", allowed.url("/a.jpg")]]),
                       callback_url=allowed.url("/hook"))
    request_id = response.json()["request_id"]
    wait_finished(client, server.url, request_id)
    deliveries = f"{server.url}/api/v1/requests/{request_id}/deliveries"
    wait_until(lambda: len(client.get(deliveries).json()["deliveries"]) >= 2,
               what="both deliveries")
    attempts = client.get(deliveries).json()["deliveries"]
    assert {a["status_code"] for a in attempts} == {307}  # recorded, not followed
    assert len(allowed.requests_to("/hook")) >= 2
    assert forbidden.requests == []
    assert {port for _, port in tripwire} == {allowed.port}


# ------------------------------------------------------- hostile image hosts


def test_hostile_hosts_fail_each_item_with_its_code(
    allowed: ImageHost, tripwire: list[tuple[str, int]], client: httpx.Client
) -> None:
    """Trickle, endless body, HTML page: each item fails fast with a clear code."""
    host = allowed
    # One byte a second: never a read timeout, so only the total deadline ends it.
    host.trickle("/trickle.jpg", JPEG, interval=1.0, content_type="image/jpeg")
    # A body that never ends, starting like a real JPEG so the sniff passes.
    host.endless("/endless.jpg", chunk=JPEG[:64] + bytes(65536), content_type="image/jpeg")
    # A web page (a login wall, an error page) served as an image.
    html = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body></body></html>"
    host.add("/page.jpg", html, content_type="image/jpeg")
    host.add("/page.html", html * 100, content_type="text/html")
    settings = _settings(host.allow, total_timeout=2.0, read_timeout=1.5,
                         max_bytes=2 * 1024 * 1024)
    with ThreadServer(create_app(settings, workers=1, shutdown_grace=0.05)) as srv:
        started = time.monotonic()
        items = _run(client, srv.url, [
            host.url("/a.jpg"), host.url("/trickle.jpg"), host.url("/endless.jpg"),
            host.url("/page.jpg"), host.url("/page.html"),
        ])
        elapsed = time.monotonic() - started
    assert [(i["status"], i["error_code"]) for i in items] == [
        ("DONE", None),
        ("FAILED", "timeout"),
        ("FAILED", "too-large"),
        ("FAILED", "not-an-image"),
        ("FAILED", "not-an-image"),
    ]
    assert elapsed < 8  # the 2 s deadline, not the trickle's 2 kB at 1 B/s
    assert "2097152" in items[2]["error_message"]  # cut at the configured cap


# ------------------------------------------------------------ CSV injection

FORMULAS = ["=1+2", "+SUM(A1:A9)", "-2+3", "@SUM(A1)", "\tTAB", "\r=CR", "=HYPERLINK(\"x\")"]


def test_formula_cells_come_out_neutralised(
    server: ThreadServer, allowed: ImageHost, client: httpx.Client
) -> None:
    header = ["S. No.", "Product Name", "Input Image Urls", "=Note"]
    rows = [[str(n), formula, allowed.url("/a.jpg"), formula]
            for n, formula in enumerate(FORMULAS, 1)]
    rows.append(["-99", "Plain name", allowed.url("/a.jpg"), " =not at the start"])
    buf = io.StringIO()
    # Quote every cell: a bare CR would otherwise end the record.
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n").writerows([header, *rows])
    response = _upload(client, server.url, buf.getvalue().encode())
    assert response.status_code == 200, response.text
    status = wait_finished(client, server.url, response.json()["request_id"])
    output = client.get(status["output_csv_url"])
    assert output.status_code == 200
    table = list(csv.reader(io.StringIO(output.text, newline="")))
    assert table[0] == ["S. No.", "Product Name", "Input Image Urls", "'=Note",
                        "Output Image Urls"]
    for formula, row in zip(FORMULAS, table[1:], strict=False):
        assert row[1] == row[3] == "'" + formula
    assert table[-1][:4] == ["'-99", "Plain name", allowed.url("/a.jpg"), " =not at the start"]
    dangerous = ("=", "+", "-", "@", "\t", "\r")
    assert not any(cell.startswith(dangerous) for row in table for cell in row)


# ------------------------------------------------- resource limits, measured


def _vm(pid: int, field: str = "VmHWM") -> int:
    """A memory figure of process *pid* from /proc, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


MB = 1024 * 1024
_FILE_PART = (b'--bound\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
              b"Content-Type: text/csv\r\n\r\n")
_MULTIPART = {"content-type": "multipart/form-data; boundary=bound"}


class Endless:
    """A lazily generated upload body of *total* bytes; ``sent`` counts what was pulled."""

    def __init__(self, total: int, chunk: bytes) -> None:
        self.total = total
        self.chunk = chunk
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        yield _FILE_PART
        self.sent = len(_FILE_PART)
        while self.sent < self.total:
            self.sent += len(self.chunk)
            yield self.chunk


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """``csvimg serve`` with the default (64 MiB) upload limit, in its own process."""
    data = tmp_path_factory.mktemp("limits") / "data"
    with ServeProcess(data, args=["--workers", "0"]) as server:
        server.wait_ready()
        yield server
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_1_gb_upload_is_refused_early_without_being_buffered(
    api: ServeProcess, declared: bool
) -> None:
    body = Endless(1024 * MB, b"1,a,https://example.com/a.jpg\n" * 2000)
    headers = dict(_MULTIPART)
    if declared:
        headers["content-length"] = str(body.total)
    before = _vm(api.proc.pid, "VmRSS")
    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        response = client.post(api.url + UPLOAD, content=body, headers=headers)
    elapsed = time.monotonic() - started
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "the upload is larger than the limit of 67108864 bytes"
    # The answer came long before the gigabyte was sent: at once when the
    # length is declared, a few socket buffers past the limit otherwise. The
    # server closes the connection instead of reading the rest.
    assert body.sent < (4 * MB if declared else 64 * MB + 16 * MB), body.sent
    assert elapsed < 10
    # And the 64 MiB it did read went to a temporary file, not to memory.
    assert _vm(api.proc.pid) - before < 40 * MB
    assert httpx.get(api.url + "/healthz").status_code == 200


@pytest.mark.slow
def test_ten_million_rows_are_refused_by_the_row_cap_with_bounded_memory(
    tmp_path: Path,
) -> None:
    def rows() -> Iterator[bytes]:
        yield _FILE_PART + b"S. No.,Product Name,Input Image Urls\n"
        for block in range(10_000):
            start = block * 1000
            yield "".join(f"{n},p,http://a.b/\n" for n in range(start, start + 1000)).encode()
        yield b"\r\n--bound--\r\n"

    env = {"CSVIMG_MAX_UPLOAD_BYTES": str(300 * MB), "CSVIMG_MAX_ROWS": "100000"}
    with ServeProcess(tmp_path / "data", env=env, args=["--workers", "0"]) as server:
        server.wait_ready()
        before = _vm(server.proc.pid, "VmRSS")
        with httpx.Client(timeout=60) as client:
            response = client.post(server.url + UPLOAD, content=rows(), headers=_MULTIPART)
            peak = _vm(server.proc.pid)
            assert response.status_code == 400, response.text
            assert [(e["code"], e["row"]) for e in response.json()["errors"]] == [
                ("too-many-rows", 100_002)
            ]
            listed = client.get(server.url + "/api/v1/status/00000000-0000-4000-8000-000000000000")
            assert listed.status_code == 404
        server.stop()
    # 240 MB of CSV went through: the file to disk, the rows up to the cap
    # (about 0.45 kB each while parsing) to memory.
    assert peak - before < 100 * MB, (before, peak)


_MEASURE = """
import sys
from csvimg_server.cli import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("VmHWM", int(line.split()[1]) * 1024, "exit", code)
"""


@pytest.mark.slow
def test_bombs_are_refused_with_bounded_memory(tmp_path: Path) -> None:
    """A 900 MP PNG and a 400 MP progressive JPEG, end to end in one process."""
    with ImageHost() as host:
        host.add("/png-900mp.png", images.png_bomb(30000, 30000), content_type="image/png")
        host.add("/jpeg-400mp.jpg", images.jpeg_header_bomb(20000, 20000),
                 content_type="image/jpeg")
        # Under Pillow's own bomb limits: only csvimg's pixel cap stops this one.
        host.add("/jpeg-64mp.jpg", images.jpeg_header_bomb(8000, 8000),
                 content_type="image/jpeg")
        host.add("/ok.jpg", JPEG, content_type="image/jpeg")
        source = tmp_path / "bombs.csv"
        source.write_bytes(make_csv([
            ["1", "PNG bomb", host.url("/png-900mp.png")],
            ["2", "JPEG bomb", host.url("/jpeg-400mp.jpg")],
            ["3", "Small JPEG bomb", host.url("/jpeg-64mp.jpg")],
            ["4", "Fine", host.url("/ok.jpg")],
        ]))
        env = {**os.environ, "CSVIMG_FETCH_ALLOW": host.allow, "CSVIMG_FETCH_RETRIES": "0"}
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, "process", str(source), "--out",
             str(tmp_path / "out")],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 0, done.stderr
    assert "done: 1 images compressed, 3 failed" in done.stdout, done.stdout
    assert done.stdout.count("too-many-pixels") == 3, done.stdout
    peak = int(done.stdout.split("VmHWM ")[1].split()[0])
    # Decoding them would take 0.9, 1.2 and 0.2 GB; the whole run stays near
    # the interpreter's own footprint.
    assert peak < 200 * MB, peak
