"""Faults, injected into real processes: nothing is lost, nothing hangs.

Each test runs the real thing (``csvimg serve`` and ``csvimg worker``
subprocesses, a redis-server of its own, a tmpfs mounted for the blobs)
and breaks one part of it in the middle of a run:

* a worker SIGKILLed mid-item, on SQLite and on Redis;
* Redis killed and started again;
* the SQLite file locked by another process, shorter and longer than the
  busy timeout;
* the blob folder full, then read-only;
* the webhook receiver down, then up;
* the API process SIGKILLed during an upload.

``docs/operations.md`` says what an operator sees in each case. Everything
talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import images
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.settings import Settings
from csvimg_server import create_app
from server_helpers import (
    ServeProcess,
    ThreadServer,
    all_items,
    free_port,
    make_csv,
    wait_finished,
    wait_until,
)
from servers import ImageHost
from services import missing, redis_url, require_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

UPLOAD = "/api/v1/upload"


def _photos(host: ImageHost, count: int, delay: float, prefix: str = "p") -> list[str]:
    """*count* distinct small JPEGs on *host*, each answered after *delay* seconds."""
    urls = []
    for n in range(count):
        path = f"/{prefix}{n}.jpg"
        host.add(path, images.photo_jpeg(96 + n, 64, metadata=False),
                 content_type="image/jpeg", delay=delay)
        urls.append(host.url(path))
    return urls


def _upload(client: httpx.Client, base: str, urls: list[str], **fields: str) -> str:
    body = make_csv([[str(n), f"P{n}", url] for n, url in enumerate(urls, 1)])
    response = client.post(base + UPLOAD, files={"file": ("f.csv", body, "text/csv")},
                           data=fields or None)
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def _progress(client: httpx.Client, base: str, request_id: str) -> int:
    response = client.get(f"{base}/api/v1/status/{request_id}")
    if response.status_code != 200:
        return -1
    progress = response.json()["progress"]
    return int(progress["done"]) + int(progress["failed"])


def _check_complete(client: httpx.Client, base: str, request_id: str, total: int,
                    timeout: float = 40) -> list[dict[str, Any]]:
    """Wait for the end; every item DONE exactly once, in the counters and the output CSV."""
    status = wait_finished(client, base, request_id, timeout=timeout)
    assert status["status"] == "COMPLETED"
    assert status["progress"] == {"total": total, "done": total, "failed": 0}
    items = all_items(client, base, request_id)
    assert [i["status"] for i in items] == ["DONE"] * total
    outputs = [i["output_url"] for i in items]
    assert len(set(outputs)) == total
    table = list(csv.reader(io.StringIO(client.get(status["output_csv_url"]).text)))
    assert [row[3] for row in table[1:]] == outputs
    return items


# ----------------------------------------------------------------- Redis


class RedisServer:
    """A redis-server of the test's own on a free port, AOF on, data in *folder*."""

    def __init__(self, folder: Path) -> None:
        self.binary = require_program("redis-server",
                                      "install Redis (e.g. `apt-get install redis-server`)")
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(self.folder),
             "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                missing(f"redis-server did not start on port {self.port}",
                        f"see {self.folder / 'redis.log'}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis", reason="the Redis backend needs redis-py (csvimg[redis])")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    yield server
    server.kill()


@pytest.fixture(params=["sqlite", "redis"])
def backend_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment putting storage and queue on SQLite (the default) or on Redis.

    Redis keys get a fresh prefix, deleted afterwards.
    """
    if request.param == "sqlite":
        yield {}
        return
    redis = pytest.importorskip("redis", reason="the Redis backend needs redis-py (csvimg[redis])")
    base = redis_url()
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    url = f"{base}?prefix={prefix}"
    yield {"CSVIMG_STORAGE": url, "CSVIMG_QUEUE": url,
           "CSVIMG_BLOBS": f"file://{tmp_path / 'images'}"}
    client = redis.Redis.from_url(base)
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


# ------------------------------------------------------ worker SIGKILLed


def test_worker_killed_mid_item_its_items_come_back_after_the_lease(
    tmp_path: Path, backend_env: dict[str, str]
) -> None:
    total, concurrency, lease = 8, 2, 1.5
    with ImageHost() as host, httpx.Client(timeout=10) as client:
        urls = _photos(host, total, delay=0.6)
        env = {"CSVIMG_FETCH_ALLOW": host.allow, "CSVIMG_LEASE_SECONDS": str(lease),
               "CSVIMG_CONCURRENCY": str(concurrency), **backend_env}
        data = tmp_path / "data"
        with ServeProcess(data, env=env, args=["--workers", "0"]) as api:
            api.wait_ready()
            request_id = _upload(client, api.url, urls)
            with ServeProcess(data, env=env, command="worker") as first:
                # Kill it once it has finished some and is holding others.
                wait_until(lambda: _progress(client, api.url, request_id) >= 2, timeout=20,
                           what="two images done")
                wait_until(lambda: sum(host.hits.values()) > _progress(client, api.url,
                                                                       request_id),
                           timeout=5, what="a download in flight")
                first.kill()
                killed_at = time.monotonic()
            in_flight = sum(host.hits.values()) - _progress(client, api.url, request_id)
            assert 1 <= in_flight <= concurrency
            with ServeProcess(data, env=env, command="worker") as second:
                items = _check_complete(client, api.url, request_id, total)
                finished_after = time.monotonic() - killed_at
                second.stop()
            api.stop()
    retried = [i for i in items if i["attempts"] > 1]
    assert 1 <= len(retried) <= concurrency, [i["attempts"] for i in items]
    assert all(i["attempts"] <= 2 for i in items)
    hits = [host.hits[f"/p{n}.jpg"] for n in range(total)]
    assert min(hits) >= 1
    assert sum(hits) <= total + concurrency, hits
    assert finished_after >= lease  # the dead worker's items waited for their lease


# -------------------------------------------------------- Redis restarted


def test_redis_restarted_mid_run_the_request_completes(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    total = 12
    with ImageHost() as host, httpx.Client(timeout=10) as client:
        urls = _photos(host, total, delay=0.3)
        env = {"CSVIMG_FETCH_ALLOW": host.allow, "CSVIMG_LEASE_SECONDS": "2",
               "CSVIMG_CONCURRENCY": "3", "CSVIMG_STORAGE": own_redis.url,
               "CSVIMG_BLOBS": f"file://{tmp_path / 'images'}"}
        data = tmp_path / "data"
        with ServeProcess(data, env=env, args=["--workers", "0"]) as api, \
                ServeProcess(data, env=env, command="worker") as worker:
            api.wait_ready()
            request_id = _upload(client, api.url, urls)
            wait_until(lambda: _progress(client, api.url, request_id) >= 3, timeout=20,
                       what="three images done")
            own_redis.kill()
            # While Redis is down the API answers at once, with a JSON 500
            # or 503, and comes back by itself.
            started = time.monotonic()
            down = client.get(f"{api.url}/api/v1/status/{request_id}", timeout=15)
            assert down.status_code == 500, down.text
            assert down.json()["error"].startswith("database error")
            assert client.get(api.url + "/readyz", timeout=15).status_code == 503
            assert client.get(api.url + "/healthz").status_code == 200
            assert time.monotonic() - started < 15
            time.sleep(1.5)
            own_redis.start()
            _check_complete(client, api.url, request_id, total, timeout=60)
            assert worker.proc.poll() is None, "the worker died with Redis:\n" + worker.log()
            # The worker is still good for new work.
            again = _upload(client, api.url, _photos(host, 2, delay=0, prefix="again"))
            _check_complete(client, api.url, again, 2)
            assert worker.stop() == 0, worker.log()
            assert api.stop() == 0, api.log()


# ---------------------------------------------------------- SQLite locked

_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


@pytest.mark.parametrize("busy_timeout", [None, 0.3], ids=["waits", "busy-timeout-0.3s"])
def test_sqlite_locked_by_another_process(tmp_path: Path, busy_timeout: float | None) -> None:
    """Another process holds the database for 2 s in the middle of a run.

    With the default busy timeout (30 s) every write waits for the lock;
    with a shorter one the writes fail, the API says so in JSON, and the
    worker's items come back after their lease. Either way the request
    completes with exact counters and nothing hangs.
    """
    total, hold = 10, 2.0
    db = tmp_path / "data" / "csvimg.db"
    with ImageHost() as host, httpx.Client(timeout=10) as client:
        urls = _photos(host, total, delay=0.25)
        env = {"CSVIMG_FETCH_ALLOW": host.allow, "CSVIMG_LEASE_SECONDS": "1.5",
               "CSVIMG_CONCURRENCY": "2"}
        if busy_timeout is not None:
            env["CSVIMG_STORAGE"] = f"sqlite:///{db}?busy_timeout={busy_timeout}"
        with ServeProcess(tmp_path / "data", env=env) as api:
            api.wait_ready()
            request_id = _upload(client, api.url, urls)
            wait_until(lambda: _progress(client, api.url, request_id) >= 2, timeout=20,
                       what="two images done")
            locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(db), str(hold)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
                locked_at = time.monotonic()
                # A write while the lock is held: it waits, or fails cleanly in JSON.
                upload: list[tuple[httpx.Response, float]] = []
                writer = threading.Thread(target=lambda: upload.append(_timed_post(
                    api.url, make_csv([["1", "A", urls[0]]]))))
                writer.start()
                answers = []
                while time.monotonic() - locked_at < hold:
                    started = time.monotonic()
                    status = client.get(f"{api.url}/api/v1/status/{request_id}")
                    answers.append(status.status_code)
                    assert status.headers["content-type"] == "application/json"
                    assert time.monotonic() - started < 5  # never hangs
                    time.sleep(0.1)
                # Reads go on under WAL while another process holds the write lock.
                assert set(answers) == {200}, answers
                writer.join(40)
                [(second, waited)] = upload
                if busy_timeout is None:
                    assert second.status_code == 200, second.text
                    assert waited >= hold * 0.5  # it waited for the lock
                else:
                    assert second.status_code == 500, second.text
                    assert "locked" in second.json()["error"]
                    assert waited < hold
                assert locker.wait(10) == 0
            finally:
                if locker.poll() is None:
                    locker.kill()
            _check_complete(client, api.url, request_id, total)
            assert api.stop() == 0, api.log()


def _timed_post(base: str, body: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(base + UPLOAD, files={"file": ("g.csv", body, "text/csv")},
                          timeout=40)
    return response, time.monotonic() - started


# ------------------------------------------------------- blob folder broken


@contextlib.contextmanager
def _tiny_tmpfs(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of *size* on *path*; yield False when mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(path)], capture_output=True, check=False,
                                 timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False,
                           timeout=10)


def _broken_writes(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """In-process stand-in for a full or read-only mount: fail writes under *root*."""
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_blob_folder_full_then_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each image fails with ``storage-error`` and the reason; the request still finishes."""
    blobs = tmp_path / "blobs"
    with ImageHost() as host, httpx.Client(timeout=10) as client, \
            _tiny_tmpfs(blobs, "256k") as mounted:
        urls = _photos(host, 3, delay=0)
        settings = Settings(blobs_url=f"file://{blobs}", storage_url="memory://",
                            fetch=FetchPolicy(allow=parse_allow(host.allow), retries=0))
        with ThreadServer(create_app(settings, workers=1, shutdown_grace=0.05)) as srv:
            # Full: fill the file system (or fail the writes, without mount rights).
            if mounted:
                fd = os.open(blobs / "filler", os.O_WRONLY | os.O_CREAT)
                try:
                    with contextlib.suppress(OSError):
                        while True:
                            os.write(fd, bytes(4096))
                finally:
                    os.close(fd)
            else:
                _broken_writes(monkeypatch, blobs, errno.ENOSPC)
            request_id = _upload(client, srv.url, urls)
            status = wait_finished(client, srv.url, request_id, timeout=20)
            assert status["status"] == "FAILED"  # every image failed: see each one's reason
            assert status["progress"] == {"total": 3, "done": 0, "failed": 3}
            for item in all_items(client, srv.url, request_id):
                assert item["error_code"] == "storage-error"
                assert "disk full" in item["error_message"]
            # Space again: the same images go through.
            if mounted:
                (blobs / "filler").unlink()
            else:
                monkeypatch.undo()
            assert wait_finished(client, srv.url, _upload(client, srv.url, urls))[
                "status"] == "COMPLETED"
            # Read-only: the same story, with the other reason.
            if mounted:
                subprocess.run(["mount", "-o", "remount,ro", str(blobs)], check=True,
                               timeout=10)
            else:
                _broken_writes(monkeypatch, blobs, errno.EROFS)
            request_id = _upload(client, srv.url, urls)
            status = wait_finished(client, srv.url, request_id, timeout=20)
            assert status["progress"] == {"total": 3, "done": 0, "failed": 3}
            reasons = {i["error_message"].rsplit(": ", 1)[-1]
                       for i in all_items(client, srv.url, request_id)}
            assert reasons == {"read-only file system"}
            assert client.get(srv.url + "/healthz").status_code == 200


# ------------------------------------------------------ receiver down, then up


class Receiver:
    """A webhook receiver on a fixed port that can be started late."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def test_webhook_receiver_down_for_a_while_then_up(tmp_path: Path) -> None:
    from standardwebhooks import Webhook as Verifier

    receiver = Receiver(free_port())
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    with ImageHost() as host, httpx.Client(timeout=10) as client:
        urls = _photos(host, 2, delay=0)
        env = {"CSVIMG_FETCH_ALLOW": f"{host.allow},127.0.0.1:{receiver.port}",
               "CSVIMG_WEBHOOK_SCHEDULE": "0.3,0.3,0.3,0.3,0.3,0.3,0.3,0.3,0.3,0.3"}
        with ServeProcess(tmp_path / "data", env=env) as api:
            api.wait_ready()
            registered = client.post(api.url + "/api/v1/webhook", json={"callback_url": hook})
            assert registered.status_code == 200, registered.text
            request_id = _upload(client, api.url, urls)
            assert wait_finished(client, api.url, request_id)["status"] == "COMPLETED"
            deliveries = f"{api.url}/api/v1/requests/{request_id}/deliveries"

            def attempts() -> list[dict[str, Any]]:
                found: list[dict[str, Any]] = client.get(deliveries).json()["deliveries"]
                return found

            wait_until(lambda: len(attempts()) >= 2, timeout=15, what="two failed deliveries")
            failed = attempts()
            assert all(a["error"].startswith("connect-error") for a in failed), failed
            receiver.start()
            try:
                wait_until(lambda: bool(receiver.received), timeout=15, what="the event")
                time.sleep(1.0)  # no second copy once one is acknowledged
                [(headers, body)] = receiver.received
            finally:
                receiver.stop()
            payload = Verifier(registered.json()["secret"]).verify(body, headers)
            assert payload["type"] == "request.completed"
            assert payload["data"]["request_id"] == request_id
            history = attempts()
            assert history[-1]["status_code"] == 204
            assert {a["event_id"] for a in history} == {headers["webhook-id"]}
            assert [a["attempt"] for a in history] == list(range(1, len(history) + 1))
            assert api.stop() == 0, api.log()


def test_webhook_survives_a_server_restart_while_the_receiver_is_down(tmp_path: Path) -> None:
    """The outbox is durable: the event recorded before a SIGKILL is sent after the restart."""
    from standardwebhooks import Webhook as Verifier

    receiver = Receiver(free_port())
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    data = tmp_path / "data"
    with ImageHost() as host, httpx.Client(timeout=10) as client:
        urls = _photos(host, 2, delay=0)
        env = {"CSVIMG_FETCH_ALLOW": f"{host.allow},127.0.0.1:{receiver.port}",
               # The second attempt waits 2 s: the kill below lands between
               # attempts, not while one holds the event's lease (60 s).
               "CSVIMG_WEBHOOK_SCHEDULE": "2,0.3,0.3,0.3,0.3,0.3,0.3,0.3,0.3,0.3"}
        with ServeProcess(data, env=env, args=["--workers", "1"]) as first:
            first.wait_ready()
            request_id = _upload(client, first.url, urls, callback_url=hook)
            assert wait_finished(client, first.url, request_id)["status"] == "COMPLETED"
            deliveries = f"{first.url}/api/v1/requests/{request_id}/deliveries"
            wait_until(lambda: len(client.get(deliveries).json()["deliveries"]) >= 1,
                       timeout=15, what="a failed delivery")
            # The attempt is logged just before the event is rescheduled (its
            # lease dropped): let that land, well before the next attempt.
            time.sleep(0.3)
            first.kill()  # no shutdown: the event is only in the outbox
        receiver.start()
        try:
            with ServeProcess(data, env=env, args=["--workers", "1"]) as second:
                second.wait_ready()
                wait_until(lambda: bool(receiver.received), timeout=20, what="the event")
                time.sleep(1.0)
                [(headers, body)] = receiver.received  # once, after the restart
                history = client.get(
                    f"{second.url}/api/v1/requests/{request_id}/deliveries"
                ).json()["deliveries"]
                assert history[0]["error"].startswith("connect-error")
                assert history[-1]["status_code"] == 204
                assert {a["event_id"] for a in history} == {headers["webhook-id"]}
                assert second.stop() == 0, second.log()
        finally:
            receiver.stop()
    secret = (data / "webhook-secret").read_text().strip()
    from csvimg.webhooks import request_secret

    payload = Verifier(request_secret(secret, request_id)).verify(body, headers)
    assert payload["data"]["request_id"] == request_id


# ---------------------------------------------------- API killed mid-upload


def _stored(db: Path) -> tuple[int, int, int, int]:
    """Requests, rows, items and orphaned rows/items in the database."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        def count(sql: str) -> int:
            value: int = conn.execute(sql).fetchone()[0]
            return value

        return (
            count("SELECT count(*) FROM requests"),
            count("SELECT count(*) FROM rows"),
            count("SELECT count(*) FROM items"),
            count("SELECT count(*) FROM items WHERE request_id NOT IN (SELECT id FROM requests)")
            + count("SELECT count(*) FROM rows WHERE request_id NOT IN (SELECT id FROM requests)"),
        )


def test_api_killed_during_an_upload_then_the_retry_works(tmp_path: Path) -> None:
    data = tmp_path / "data"
    total = 6
    with ImageHost() as host, httpx.Client(timeout=10) as client:
        urls = _photos(host, total, delay=0)
        csv_body = make_csv([[str(n), f"P{n}", url] for n, url in enumerate(urls, 1)])
        env = {"CSVIMG_FETCH_ALLOW": host.allow}
        with ServeProcess(data, env=env) as first:
            first.wait_ready()
            half_sent = threading.Event()
            outcome: list[BaseException | httpx.Response] = []

            def body() -> Iterator[bytes]:
                yield (b'--bound\r\nContent-Disposition: form-data; name="file"; '
                       b'filename="f.csv"\r\n\r\n')
                yield csv_body[: len(csv_body) // 2]
                half_sent.set()
                time.sleep(3)  # the server dies in the meantime
                yield csv_body[len(csv_body) // 2:] + b"\r\n--bound--\r\n"

            def send() -> None:
                try:
                    outcome.append(httpx.post(
                        first.url + UPLOAD, content=body(), timeout=10,
                        headers={"content-type": "multipart/form-data; boundary=bound"}))
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            sender = threading.Thread(target=send)
            sender.start()
            assert half_sent.wait(10)
            time.sleep(0.2)
            first.kill()
            sender.join(15)
        [result] = outcome
        assert isinstance(result, httpx.HTTPError), result  # the client saw the failure
        with ServeProcess(data, env=env) as second:
            second.wait_ready()
            assert _stored(data / "csvimg.db")[:3] == (0, 0, 0)  # no half-stored request
            assert client.get(f"{second.url}/api/v1/webhook").status_code == 200
            # The client's retry.
            response = client.post(second.url + UPLOAD,
                                   files={"file": ("f.csv", csv_body, "text/csv")})
            assert response.status_code == 200, response.text
            _check_complete(client, second.url, response.json()["request_id"], total)
            assert second.stop() == 0, second.log()


def _wait_for_a_writer(db: Path, timeout: float = 20) -> bool:
    """Return once another connection holds the write lock of *db* (False on timeout)."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(sqlite3.connect(db, timeout=0, isolation_level=None)) as probe:
        while time.monotonic() < deadline:
            try:
                probe.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # "database is locked": a write is under way
                return True
            probe.execute("ROLLBACK")
            time.sleep(0.002)
    return False


@pytest.mark.parametrize("after", [0.0, 0.1])
def test_api_killed_while_storing_a_large_request_is_all_or_nothing(
    tmp_path: Path, after: float
) -> None:
    """SIGKILL while the server writes a 30 000-row request to SQLite."""
    data = tmp_path / "data"
    rows = 30_000
    body = make_csv([[str(n), "P", f"https://example.com/{n}.jpg"] for n in range(rows)])
    with ServeProcess(data, args=["--workers", "0"]) as server:
        server.wait_ready()
        sender = threading.Thread(target=_post_quietly, args=(server.url, body))
        sender.start()
        assert _wait_for_a_writer(data / "csvimg.db"), server.log()
        time.sleep(after)
        server.kill()
        sender.join(30)
    requests, stored_rows, items, orphans = _stored(data / "csvimg.db")
    # Either the whole request is there, or nothing of it.
    assert orphans == 0
    assert requests in (0, 1)
    assert (stored_rows, items) == (rows * requests, rows * requests)
    # And the server starts again on that database.
    with ServeProcess(data, args=["--workers", "0"]) as again:
        again.wait_ready()
        assert again.stop() == 0


def _post_quietly(base: str, body: bytes) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(base + UPLOAD, files={"file": ("big.csv", body, "text/csv")}, timeout=30)

