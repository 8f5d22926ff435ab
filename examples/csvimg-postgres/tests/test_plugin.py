"""The plugin as csvimg sees it: URLs, entry point, and a whole request end to end."""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator

import pytest
from csvimg import ConfigError, Engine, RequestStatus, Settings
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.plugins import Plugins
from PIL import Image

import csvimg_postgres
from csvimg_postgres import PostgresQueue, PostgresStorage, parse_postgres_url


def test_url_parameters() -> None:
    url = parse_postgres_url(
        "postgres://u:secret@db:5433/csvimg?schema=shop1&pool_size=3&sslmode=require"
    )
    assert (url.schema, url.pool_size) == ("shop1", 3)
    assert url.conninfo == "postgres://u:secret@db:5433/csvimg?sslmode=require"
    assert "secret" not in url.redacted()
    assert "secret" not in repr(PostgresStorage(url))
    default = parse_postgres_url("postgresql:///csvimg")
    assert (default.schema, default.pool_size) == ("csvimg", 10)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://db/x",
        "postgresql://db/x?schema=bad-name",
        "postgresql://db/x?schema=1abc",
        "postgresql://db/x?pool_size=0",
        "postgresql://db/x?pool_size=many",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_postgres_url(url)


def test_entry_point_registers_both_schemes() -> None:
    plugins = Plugins()  # loads the installed entry points, ours included
    for scheme in ("postgresql", "postgres"):
        assert isinstance(plugins.storage(f"{scheme}://db/x", Settings()), PostgresStorage)
        assert isinstance(plugins.queue(f"{scheme}://db/x", Settings()), PostgresQueue)


def test_disabled_plugins_blocks_it() -> None:
    plugins = Plugins(environ={"CSVIMG_DISABLED_PLUGINS": "postgres"})
    assert "postgresql" not in plugins.registry.storage
    plugins = Plugins(load_entrypoints=False, extra=[csvimg_postgres])
    assert "postgresql" in plugins.registry.storage


def _png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def image_host() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 with /red.png and /blue.png; yields its base URL."""
    images = {"/red.png": _png("red"), "/blue.png": _png("blue")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.anyio
async def test_engine_end_to_end(schema_url: str, image_host: str) -> None:
    """A CSV goes through an Engine whose storage and queue are this plugin's."""
    settings = Settings(
        storage_url=schema_url,  # the queue URL defaults to it: PostgresQueue
        blobs_url="memory://",
        fetch=FetchPolicy(allow=parse_allow(image_host.removeprefix("http://"))),
    )
    csv = (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,SKU1,"{image_host}/red.png,{image_host}/blue.png"\n'
        f"2,SKU2,{image_host}/missing.png\n"
    ).encode()
    async with Engine(settings) as engine:
        assert isinstance(engine.storage, PostgresStorage)
        assert isinstance(engine.queue, PostgresQueue)
        request = await engine.submit(csv)
        finished = await engine.run_until_finished(request.id, timeout=60)
        assert (finished.status, finished.done, finished.failed) == (
            RequestStatus.COMPLETED,
            2,
            1,
        )
        output = (await engine.output_csv_bytes(request.id)).decode()
    assert output.splitlines()[0].endswith("Output Image Urls")
    assert len(output.splitlines()) == 3
