"""`EngineSmokeTests`: a whole request through an `Engine` on a plugin's backends.

The contract suites prove each backend on its own; this one proves they
work together under the real engine: a CSV of a few images, served by an
HTTP server this suite starts on 127.0.0.1, is submitted, a worker runs
until the request finishes, and the counts, stored images and output CSV
are checked. A subclass provides one fixture::

    class TestPostgresEngine(EngineSmokeTests):
        @pytest.fixture
        def engine_settings(self, schema_url):
            return Settings(storage_url=schema_url, blobs_url="memory://")

The suite replaces the settings' ``fetch`` policy (to allow exactly its
image server) and ``public_url``; everything else is the subclass's. To
hand the engine backend objects rather than URLs, override
``engine_backends`` (the engine opens and closes them).
"""

from __future__ import annotations

import csv
import http.server
import io
import threading
from collections.abc import Iterator
from typing import ClassVar, TypedDict

import pytest
from PIL import Image

from csvimg.backends import BlobStore, Queue, Storage
from csvimg.engine import Engine
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.jobs import ItemStatus, RequestStatus
from csvimg.settings import Settings
from csvimg.testing._helpers import _AnyioContract

__all__ = ["EngineBackends", "EngineSmokeTests"]


class EngineBackends(TypedDict, total=False):
    """Backend objects for the `Engine`, in place of the settings' URLs."""

    storage: Storage
    queue: Queue
    blobs: BlobStore


def _image(color: str, format: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(out, format)
    return out.getvalue()


class _ImageServer:
    """A threaded HTTP server on 127.0.0.1 answering GETs from a dict of paths."""

    def __init__(self, images: dict[str, tuple[bytes, str]]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, content_type = images.get(self.path, (b"not found", "text/plain"))
                self.send_response(200 if self.path in images else 404)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep the test output quiet

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.authority = f"127.0.0.1:{self._server.server_address[1]}"
        """``127.0.0.1:PORT``: the allow-list entry for exactly this server."""

    def url(self, path: str) -> str:
        """The full URL of *path* on this server."""
        return f"http://{self.authority}{path}"

    def __enter__(self) -> _ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class EngineSmokeTests(_AnyioContract):
    """An `Engine` on the subclass's backends runs requests to the end.

    A subclass provides the ``engine_settings`` fixture: `Settings` whose
    ``storage_url``, ``queue_url`` and ``blobs_url`` name fresh, empty
    backends for each test (``memory://`` blobs are fine when only
    storage and queue are under test).
    """

    timeout: ClassVar[float] = 60.0
    """Seconds a request may take to finish before the test fails."""

    public_url: ClassVar[str] = "https://img.example"
    """The public base URL the output CSV's image URLs start with."""

    @pytest.fixture
    def engine_backends(self) -> EngineBackends:
        """Backend objects for the engine; none by default (built from the URLs)."""
        return {}

    @pytest.fixture
    def image_server(self) -> Iterator[_ImageServer]:
        """Serves ``/red.png`` and ``/blue.jpg``; anything else is a 404."""
        images = {
            "/red.png": (_image("red", "PNG"), "image/png"),
            "/blue.jpg": (_image("blue", "JPEG"), "image/jpeg"),
        }
        with _ImageServer(images) as server:
            yield server

    @pytest.fixture
    def engine(
        self,
        engine_settings: Settings,
        engine_backends: EngineBackends,
        image_server: _ImageServer,
    ) -> Engine:
        """An engine (not yet opened) allowed to fetch from `image_server` only."""
        settings = engine_settings.evolve(
            fetch=FetchPolicy(allow=parse_allow(image_server.authority), retries=0),
            public_url=self.public_url,
        )
        return Engine(settings, **engine_backends)

    async def test_request_runs_to_completion(
        self, engine: Engine, image_server: _ImageServer
    ) -> None:
        """Two images and a 404: COMPLETED, 2 done, 1 failed, the output CSV links both."""
        red, blue, missing = (image_server.url(p) for p in ("/red.png", "/blue.jpg", "/gone.png"))
        data = (
            "S. No.,Product Name,Input Image Urls\n"
            f'1,SKU1,"{red},{blue}"\n'
            f"2,SKU2,{missing}\n"
        ).encode()
        async with engine:
            request = await engine.submit(data, filename="smoke.csv")
            assert request.total == 3
            finished = await engine.run_until_finished(request.id, timeout=self.timeout)
            assert (finished.status, finished.done, finished.failed) == (
                RequestStatus.COMPLETED, 2, 1,
            )
            assert await engine.get_request(request.id) == finished
            items = await engine.items(request.id)
            assert [(i.row, i.position, i.url) for i in items] == [
                (0, 0, red), (0, 1, blue), (1, 0, missing),
            ]
            assert [i.status for i in items] == [
                ItemStatus.DONE, ItemStatus.DONE, ItemStatus.FAILED,
            ]
            assert items[2].error_code == "http-404"
            outputs = []
            for item in items[:2]:
                assert item.output_key is not None
                assert await engine.blobs.get(item.output_key)
                outputs.append(engine.image_url(item))
            assert all(url and url.startswith(self.public_url) for url in outputs)
            out = (await engine.output_csv_bytes(request.id)).decode()
        rows = list(csv.reader(io.StringIO(out)))
        assert rows == [
            ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"],
            ["1", "SKU1", f"{red},{blue}", ",".join(str(url) for url in outputs)],
            ["2", "SKU2", missing, ""],
        ]

    async def test_request_of_failures_only_is_failed(
        self, engine: Engine, image_server: _ImageServer
    ) -> None:
        """Every image a 404: FAILED, and the output CSV has an empty output cell."""
        missing = image_server.url("/gone.png")
        data = f"S. No.,Product Name,Input Image Urls\n1,SKU1,{missing}\n".encode()
        async with engine:
            request = await engine.submit(data)
            finished = await engine.run_until_finished(request.id, timeout=self.timeout)
            assert (finished.status, finished.done, finished.failed) == (
                RequestStatus.FAILED, 0, 1,
            )
            out = (await engine.output_csv_bytes(request.id)).decode()
        assert list(csv.reader(io.StringIO(out)))[1:] == [["1", "SKU1", missing, ""]]
