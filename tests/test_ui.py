"""The browser upload page (`csvimg_server.ui`), end to end in a real browser.

Playwright for Python drives Debian's Chromium (``/usr/bin/chromium``;
Playwright's own browser download cannot work here) against a real uvicorn
server whose fetcher may reach a local `ImageHost` serving real JPEG and
PNG photos. Without Chromium or Playwright the browser tests are skipped,
except under ``CSVIMG_REQUIRE_SERVICES=1`` (CI), where they fail.

The finished page is saved as ``docs/img/upload-page.png`` for the docs.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import pytest
from starlette.applications import Starlette

from csvimg.settings import Settings
from csvimg_server import create_app
from csvimg_server.ui import STATIC_DIR, ui_routes
from server_helpers import ThreadServer, make_csv, photo_jpeg, serve_photos
from servers import ImageHost

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "upload-page.png"
API_KEY = "ck_test_0123456789abcdef"


def ui_app(host: ImageHost, *, api_key: str | None = None) -> Starlette:
    """The normal app plus the page's routes (as ``csvimg serve`` builds it).

    With *api_key*, API keys are on (``CSVIMG_API_KEYS`` with that one key).
    """
    settings = Settings.from_env({"CSVIMG_FETCH_ALLOW": host.allow})
    return with_ui(create_app(settings, workers=1, shutdown_grace=0.05, api_keys=api_key))


def with_ui(app: Starlette) -> Starlette:
    """Add the page's routes to *app* unless it serves them already."""
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.router.routes.extend(ui_routes())
    return app


# ------------------------------------------------------- without a browser


def test_page_and_static_files_are_served() -> None:
    app = Starlette(routes=ui_routes())
    with ThreadServer(app) as server, httpx.Client(base_url=server.url) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assert '<html lang="en">' in page.text
        assert "__CSVIMG_VERSION__" not in page.text  # asset URLs carry the version
        for name, media in (("app.js", "javascript"), ("style.css", "text/css")):
            asset = client.get(f"/static/{name}")
            assert asset.status_code == 200 and media in asset.headers["content-type"]
            assert asset.text == (STATIC_DIR / name).read_text(encoding="utf-8")
        assert client.get("/static/nope.js").status_code == 404


def test_csp_allows_the_public_origin_for_fetches() -> None:
    settings = Settings.from_env({}, public_url="https://img.example.com/csvimg")
    app = with_ui(create_app(settings, workers=0, api_keys=None))
    with ThreadServer(app) as server:
        csp = httpx.get(server.url + "/").headers["content-security-policy"]
    assert "connect-src 'self' https://img.example.com;" in csp
    assert "img-src * data: blob:" in csp


def test_index_has_labels_for_every_input() -> None:
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    for control in ("file", "callback-url", "quality", "api-key"):
        assert f'<label for="{control}"' in html
        assert f'id="{control}"' in html
    assert html.count("<h1") == 1
    assert 'role="status"' in html and 'aria-live="polite"' in html


# --------------------------------------------------------------- browser


def _require(reason: str) -> NoReturn:
    if os.environ.get("CSVIMG_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (CSVIMG_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium under Playwright, headless; one per module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require("playwright is not installed (pip install -e '.[dev]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _require(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (own storage) with a wide viewport."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.set_default_timeout(20_000)
    new_page = context.new_page()
    errors: list[str] = []
    new_page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield new_page
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


@pytest.fixture
def host() -> Iterator[ImageHost]:
    """Real photos (/a.jpg, /b.jpg, /c.png, /d.jpg); /slow.jpg takes a moment."""
    with ImageHost() as image_host:
        serve_photos(image_host)
        image_host.add(
            "/slow.jpg", photo_jpeg(900, 700, seed=7), content_type="image/jpeg", delay=0.6
        )
        yield image_host


def _products_csv(host: ImageHost) -> bytes:
    return make_csv(
        [
            ["1", "Linen shirt", f"{host.url('/a.jpg')},{host.url('/c.png')}"],
            ["2", "Ceramic mug", f"{host.url('/missing.jpg')},{host.url('/b.jpg')}"],
            ["3", "Desk lamp", host.url("/slow.jpg")],
        ]
    )


def _choose(page: Page, name: str, body: bytes) -> None:
    from playwright.sync_api import FilePayload

    payload: FilePayload = {"name": name, "mimeType": "text/csv", "buffer": body}
    page.set_input_files("#file", files=[payload])


def _wait_for_results(page: Page) -> None:
    page.wait_for_selector("#results:not([hidden])", timeout=30_000)
    # Every thumbnail is done loading, and the compressed ones have real pixels.
    page.wait_for_function(
        """() => {
            const imgs = [...document.querySelectorAll('#products-table img')];
            const after = imgs.filter((i) => i.dataset.kind === "after");
            return after.length > 0 && imgs.every((i) => i.complete && !i.dataset.src)
                && after.every((i) => i.naturalWidth > 0);
        }""",
        timeout=15_000,
    )


def _after_images(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.eval_on_selector_all(
        'img[data-kind="after"]',
        "imgs => imgs.map(i => ({src: i.currentSrc, width: i.naturalWidth, alt: i.alt}))",
    )
    return result


def test_upload_progress_results_and_screenshot(
    page: Page, host: ImageHost, tmp_path: Path
) -> None:
    with ThreadServer(ui_app(host)) as server:
        page.goto(server.url + "/")
        assert page.title().startswith("csvimg")
        assert page.get_attribute("html", "lang") == "en"
        assert page.locator("h1").count() == 1

        # Every control has a label; the drop zone is the file input itself.
        for control in ("#file", "#callback-url", "#quality", "#api-key"):
            assert page.eval_on_selector(control, "el => el.labels.length") == 1
        page.keyboard.press("Tab")  # the skip link
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "file"

        _choose(page, "products.csv", _products_csv(host))
        assert "products.csv" in page.inner_text("#file-status")
        page.fill("#quality", "60")
        page.click("#submit")

        # The progress section appears at once and ends full.
        page.wait_for_selector("#progress-section:not([hidden])")
        _wait_for_results(page)
        assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [5, 5]
        assert "Finished" in page.inner_text("#progress-text")
        page.wait_for_function(
            "() => document.getElementById('live').textContent.includes('Finished')"
        )
        request_id = page.inner_text("#request-id")
        assert page.evaluate("location.hash") == f"#request={request_id}"

        # Products grouped by row, with their names from the output CSV.
        labels = page.locator("#products-table .product-label").all_inner_texts()
        assert labels == ["No. 1 · Linen shirt", "No. 2 · Ceramic mug", "No. 3 · Desk lamp"]
        assert page.locator("#products-table tbody.product").nth(0).locator("tr").count() == 2

        after = _after_images(page)
        assert len(after) == 4
        assert all(a["width"] > 0 for a in after)
        assert all(a["src"].startswith(f"{server.url}/api/v1/images/") for a in after)
        # The "before" thumbnails are the input URLs; the 404 one shows a placeholder.
        befores = page.eval_on_selector_all(
            'img[data-kind="before"]', "imgs => imgs.map(i => i.naturalWidth)"
        )
        assert len(befores) == 4 and all(w > 0 for w in befores)
        assert page.locator(".thumb-missing").count() == 1

        # Sizes and savings per image; the failure with its code and message.
        sizes = page.locator("td.size").all_inner_texts()
        assert len(sizes) == 4 and all("→" in s for s in sizes)
        saved = page.locator("td.saved").all_inner_texts()
        assert all(s.endswith("%") for s in saved)
        failure = page.inner_text("td.failure")
        assert "Failed" in failure and "http-404" in failure
        stats = dict(
            page.eval_on_selector_all(
                "#summary-stats .stat",
                "ss => ss.map(s => [s.querySelector('dt').textContent,"
                " s.querySelector('dd').textContent])",
            )
        )
        assert (stats["Images"], stats["Compressed"], stats["Failed"]) == ("5", "4", "1")
        assert stats["Saved"].endswith("%") and "→" in stats["Size"]

        # The link to the output CSV, which holds the compressed images' URLs.
        href = page.get_attribute("#output-link", "href")
        assert href == f"{server.url}/api/v1/requests/{request_id}/output.csv"
        table = list(csv.reader(io.StringIO(httpx.get(href).text)))
        assert table[0][-1] == "Output Image Urls"
        assert table[2][3].startswith(",")  # the failed image keeps its place, empty

        # Thumbnails below the fold are decoded lazily: make sure they are painted.
        page.evaluate("Promise.all([...document.images].map((i) => i.decode().catch(() => 0)))")
        shot = tmp_path / "upload-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("CSVIMG_UPDATE_SCREENSHOT"):
            # Refresh the docs' picture on demand only, so a test run leaves
            # the work tree clean.
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)

        # Reloading the page follows the request again from the URL.
        page.reload()
        _wait_for_results(page)
        assert len(_after_images(page)) == 4


def test_validation_errors_are_shown_inline(page: Page, host: ImageHost) -> None:
    bad = (
        b"S. No.,Product Name,Input Image Urls\n"
        b"1,,ftp://example.com/a.jpg\n"
        b"1,Mug,https://example.com/b.jpg\n"
    )
    with ThreadServer(ui_app(host)) as server:
        page.goto(server.url + "/")
        page.click("#submit")  # no file yet
        assert "Choose a CSV file" in page.inner_text("#message")

        _choose(page, "bad.csv", bad)
        page.click("#submit")
        page.wait_for_selector("#problems:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "problems-heading"
        assert "bad.csv" in page.inner_text("#problems-summary")
        rows = page.eval_on_selector_all(
            "#problems-table tbody tr",
            "trs => trs.map(tr => [...tr.cells].map(td => td.textContent))",
        )
        by_code = {r[2]: r for r in rows}
        assert by_code["blank-product-name"][:2] == ["2", "Product Name"]
        assert by_code["bad-scheme"][:2] == ["2", "Input Image Urls"]
        assert by_code["duplicate-serial"][0] == "3"
        assert all(r[3] for r in rows)  # a message for each
        assert page.is_hidden("#progress-section") and page.is_hidden("#results")

        # An option the server refuses is a plain message, not a table.
        _choose(page, "products.csv", make_csv([["1", "A", host.url("/a.jpg")]]))
        page.fill("#quality", "0")
        page.click("#submit")
        page.wait_for_selector("#message:not([hidden])")
        assert "quality" in page.inner_text("#message")
        assert page.is_hidden("#problems")


def test_api_key_is_asked_for_and_sent_only_to_the_server(page: Page, host: ImageHost) -> None:
    with ThreadServer(ui_app(host, api_key=API_KEY)) as server:
        page.goto(server.url + "/")
        _choose(
            page,
            "one.csv",
            make_csv([["1", "Shirt", host.url("/a.jpg")], ["2", "Mug", host.url("/c.png")]]),
        )
        page.click("#submit")
        page.wait_for_selector("#message:not([hidden])")
        assert "needs an API key" in page.inner_text("#message")
        assert page.evaluate("document.activeElement.id") == "api-key"

        page.fill("#api-key", "wrong")
        page.click("#submit")
        page.wait_for_function(
            "() => document.getElementById('message').textContent.includes('refused')"
        )

        page.fill("#api-key", API_KEY)
        page.click("#submit")
        _wait_for_results(page)
        after = _after_images(page)
        assert len(after) == 2
        # <img> cannot send the key: the thumbnails were fetched into blob: URLs.
        assert all(a["src"].startswith("blob:") and a["width"] > 0 for a in after)
        # The image host (the "before" thumbnails) never saw the key.
        assert host.requests, "the browser loaded no original image"
        assert all(r.header("authorization") is None for r in host.requests)

        # The key is kept for this tab only (sessionStorage), across reloads.
        assert page.evaluate("sessionStorage.getItem('csvimg.apiKey')") == API_KEY
        page.reload()
        assert page.input_value("#api-key") == API_KEY
        _wait_for_results(page)

        # The output CSV link downloads with the key, too.
        with page.expect_download() as download_info:
            page.click("#output-link")
        path = download_info.value.path()
        assert path is not None
        text = Path(path).read_text(encoding="utf-8")
        assert text.startswith("S. No.,Product Name,Input Image Urls,Output Image Urls")
