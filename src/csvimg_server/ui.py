"""The browser upload page: ``GET /`` and its files under ``/static/``.

Plain HTML, CSS and JavaScript shipped inside the package (no build step);
the page talks to the public HTTP API only (upload, status, items, output
CSV, images), exactly as any other client does, so it needs no routes of
its own beyond these two. `ui_routes` returns them for the app's route
list.

The page is served with a strict Content-Security-Policy: scripts and
styles only from this server, no inline code; images from anywhere (the
"before" thumbnails are the input URLs, on the shops' own hosts) and from
``blob:`` URLs (thumbnails fetched with an API key).
"""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "index", "ui_routes"]

STATIC_DIR: Final = Path(__file__).with_name("static")
"""The folder of the page's files (``index.html``, ``app.js``, ``style.css``)."""

_VERSION_MARK: Final = "__CSVIMG_VERSION__"


@functools.cache
def _index_html() -> str:
    try:
        version = metadata.version("csvimg")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        version = "dev"
    # The version in the asset URLs makes browsers fetch new files after an
    # upgrade instead of trusting a cached copy.
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace(_VERSION_MARK, version)


def _origin(url: str | None) -> str | None:
    """Return ``scheme://host[:port]`` of an absolute http(s) URL, else None."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def _csp(public_url: str | None) -> str:
    # The API hands out absolute URLs under CSVIMG_PUBLIC_URL; when that is
    # another origin than the page's, the page must still be allowed to
    # fetch thumbnails from it (with an API key they are fetched, not <img>).
    connect = " ".join(filter(None, ["'self'", _origin(public_url)]))
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src * data: blob:",
            f"connect-src {connect}",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )


async def index(request: Request) -> Response:
    """``GET /``: the upload page."""
    engine = getattr(request.app.state, "engine", None)
    public_url = getattr(getattr(engine, "settings", None), "public_url", None)
    return HTMLResponse(
        _index_html(),
        headers={
            "Content-Security-Policy": _csp(public_url if isinstance(public_url, str) else None),
            "X-Content-Type-Options": "nosniff",
            # The "before" thumbnails load from third-party hosts: tell them nothing.
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


def ui_routes() -> list[BaseRoute]:
    """Return the routes of the upload page: ``/`` and ``/static/...``.

    Add them to the app's routes (``routes=[*api_routes, *ui_routes()]``).
    Both must be reachable without an API key: the page asks for the key
    and sends it with its own API calls.
    """
    return [
        Route("/", index, methods=["GET"], name="ui_index"),
        Mount(
            "/static",
            app=StaticFiles(packages=[("csvimg_server", "static")]),
            name="static",
        ),
    ]
