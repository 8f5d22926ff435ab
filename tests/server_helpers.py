"""Helpers for the server and CLI tests: real uvicorn servers, CSVs, schemas.

- `ThreadServer` runs an app under a real uvicorn in a background thread
  (fast: no process start-up), on a socket bound to a free 127.0.0.1 port.
- `ServeProcess` runs ``python -m csvimg_server serve`` as a subprocess,
  for the end-to-end, restart and kill -9 tests.
- `make_csv`, `photo_png`, `validate` (a small JSON Schema checker for the
  subset `csvimg_server.openapi` uses) and polling helpers.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

import images
from servers import ImageHost

T = TypeVar("T")

FINISHED = ("COMPLETED", "FAILED")


def free_port() -> int:
    """A port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThreadServer:
    """A real uvicorn serving *app* from a background thread.

    The listening socket is bound before the thread starts, so ``url`` is
    valid at once; ``__enter__`` returns when the app's lifespan startup
    has finished. `call` runs a coroutine on the server's own event loop
    (e.g. to poke the engine's backends).
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=f"uvicorn:{self.port}", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by __enter__ / stop
            self._error = exc

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self._sock])

    def start(self) -> Self:
        """Start serving; wait until the app is up."""
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Shut down gracefully (lifespan shutdown included)."""
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
        if self._thread.is_alive():  # pragma: no cover - a hung shutdown
            self.server.force_exit = True
            self._thread.join(timeout=5)
            raise RuntimeError("uvicorn did not stop")

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
        """Run ``fn()`` on the server's event loop and return its result."""
        assert self._loop is not None

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServeProcess:
    """``python -m csvimg_server serve`` in a subprocess on a free port.

    Output goes to ``<log_dir>/serve-N.log`` (shown by `log` when a test
    fails). `stop` sends SIGTERM and returns the exit code; `kill` is
    ``kill -9``.
    """

    _count = 0

    def __init__(
        self,
        data_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
        command: str = "serve",
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ServeProcess._count += 1
        self.log_path = data_dir.parent / f"{command}-{ServeProcess._count}.log"
        full_env = {**os.environ, **(env or {})}
        argv = [sys.executable, "-m", "csvimg_server", command]
        if command == "serve":
            argv += ["--port", str(self.port)]
        argv += ["--data-dir", str(data_dir), *args]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 20) -> Self:
        """Block until ``/healthz`` answers (serve only)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """What the process wrote so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """``kill -9``: no shutdown of any kind."""
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


# ------------------------------------------------------------------ content


def make_csv(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None = None) -> bytes:
    """Encode a manifest: the standard header, then *rows* (URLs joined by commas)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header or ("S. No.", "Product Name", "Input Image Urls"))
    writer.writerows(rows)
    return buf.getvalue().encode()


def photo_png(width: int, height: int, seed: int = 1) -> bytes:
    """A photo-like PNG (large, so a JPEG of it is surely smaller)."""
    buf = io.BytesIO()
    images.photo(width, height, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def photo_jpeg(width: int, height: int, seed: int = 1) -> bytes:
    """A photo-like JPEG at quality 90; *seed* makes each one different."""
    buf = io.BytesIO()
    images.photo(width, height, seed=seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wait_finished(
    client: httpx.Client, base: str, request_id: str, timeout: float = 30
) -> dict[str, Any]:
    """Poll the status API until the request finished; return the status."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"{base}/api/v1/status/{request_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in FINISHED:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"request {request_id} not finished: {body}")
        time.sleep(0.05)


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    """Poll *predicate* until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def all_items(client: httpx.Client, base: str, request_id: str) -> list[dict[str, Any]]:
    """Every item of a request, following the ``next`` links."""
    url: str | None = f"{base}/api/v1/requests/{request_id}/items?limit=1000"
    out: list[dict[str, Any]] = []
    while url:
        page = client.get(url)
        assert page.status_code == 200, page.text
        out.extend(page.json()["items"])
        url = page.json()["next"]
    return out


# ------------------------------------------------------------------ fixtures


@functools.cache
def photos() -> dict[str, tuple[bytes, str]]:
    """The routes of `photo_host`: path -> (body, content type)."""
    return {
        "/a.jpg": (photo_jpeg(640, 480, seed=1), "image/jpeg"),
        "/b.jpg": (photo_jpeg(480, 640, seed=2), "image/jpeg"),
        "/c.png": (photo_png(320, 240, seed=3), "image/png"),
        "/d.jpg": (photo_jpeg(800, 600, seed=4), "image/jpeg"),
    }


def serve_photos(host: ImageHost) -> ImageHost:
    """Add the routes of `photo_host` to *host*."""
    for path, (body, content_type) in photos().items():
        host.add(path, body, content_type=content_type)
    return host


@pytest.fixture
def photo_host() -> Iterator[ImageHost]:
    """An `ImageHost` serving real photos: /a.jpg, /b.jpg, /c.png, /d.jpg."""
    with ImageHost() as host:
        yield serve_photos(host)


@pytest.fixture(scope="module")
def shared_photo_host() -> Iterator[ImageHost]:
    """`photo_host` shared by a module's tests (for tests that add no routes)."""
    with ImageHost() as host:
        yield serve_photos(host)


# ------------------------------------------------------------ JSON schemas


def validate(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> None:
    """Check *value* against *schema* (refs resolved in the OpenAPI *root*).

    Uses ``jsonschema`` (Draft 2020-12, which OpenAPI 3.1 schemas are), an
    implementation independent of ours; raises AssertionError on a mismatch.
    """
    import jsonschema

    wrapped = {**schema, "components": root.get("components", {})}
    try:
        jsonschema.Draft202012Validator(wrapped).validate(value)
    except jsonschema.ValidationError as exc:
        raise AssertionError(f"{exc.json_path}: {exc.message}") from None


def check_response(
    document: Mapping[str, Any], template: str, method: str, response: httpx.Response
) -> None:
    """Validate a real response against the document's schema for it."""
    operation = document["paths"][template][method.lower()]
    spec = operation["responses"].get(str(response.status_code))
    assert spec is not None, f"{method} {template}: status {response.status_code} not documented"
    content = spec.get("content")
    if not content:
        return
    media = response.headers.get("content-type", "").split(";")[0].strip()
    assert media in content, f"{method} {template}: {media} undocumented for {response.status_code}"
    if media == "application/json":
        validate(response.json(), content[media]["schema"], document)
