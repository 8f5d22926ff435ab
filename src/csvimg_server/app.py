"""The Starlette application: the HTTP API of csvimg.

`create_app` builds a small app around one `csvimg.Engine`. Its lifespan
opens the engine and, unless ``workers`` is 0, runs that many worker loops
plus one outbox (webhook delivery) loop in a task group; shutdown lets
in-flight images finish for a moment and then cancels (leases hand the rest
to the next worker). Every answer is JSON, errors included.

Routes (see `csvimg_server.openapi` for the full contract)::

    POST   /api/v1/upload                             upload a CSV
    GET    /api/v1/status/{request_id}                progress of a request
    GET    /api/v1/requests/{request_id}/items        per-image results, paginated
    GET    /api/v1/requests/{request_id}/output.csv   the output CSV (409 while running)
    GET    /api/v1/requests/{request_id}/deliveries   webhook delivery attempts
    GET    /api/v1/images/{key}                       an output image
    POST   /api/v1/webhook                            register a webhook
    GET    /api/v1/webhook                            list registrations
    DELETE /api/v1/webhook/{webhook_id}               delete a registration
    GET    /healthz                                   liveness
    GET    /readyz                                    storage and queue reachable
    GET    /metrics                                   Prometheus metrics
    GET    /openapi.json                              the OpenAPI document

With API keys (``CSVIMG_API_KEYS``, see `csvimg_server.auth`) every route
but the health checks, ``/metrics``, ``/openapi.json`` and the upload page
(``/``, ``/static/``) needs ``Authorization: Bearer <key>``, and a request
with everything about it (status, items, output CSV, deliveries, images)
and webhook registrations are visible only to the key's owner: another
owner gets the same 404 as for an unknown id. Without keys there is one
user and no access control.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import attrs
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csvimg._errors import (
    CsvimgError,
    FetchError,
    ManifestError,
    NotFinishedError,
    NotFoundError,
    StorageError,
)
from csvimg.codec import output_formats
from csvimg.engine import IMAGES_PATH, Engine
from csvimg.fetch import check_url, resolve_checked
from csvimg.jobs import Item, ProcessOptions, Webhook
from csvimg.jobs import Request as Job
from csvimg.settings import Settings
from csvimg.webhooks import new_secret, request_secret
from csvimg_server._upload import (
    BadUpload,
    TooLarge,
    Upload,
    check_declared_length,
    read_upload,
)
from csvimg_server.auth import FROM_ENV, ApiKeyAuth, ApiKeys, FromEnv, owner_of
from csvimg_server.logs import register_secrets
from csvimg_server.metrics import CONTENT_TYPE, HttpMetrics, Metrics
from csvimg_server.openapi import openapi_document
from csvimg_server.ui import ui_routes

__all__ = ["Lifespan", "create_app", "iso_time"]

log = logging.getLogger("csvimg.server")

DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
SHUTDOWN_GRACE: Final = 10.0
"""Seconds in-flight items get to finish when the server stops."""

_UPLOAD_FIELDS: Final = frozenset({"file", "callback_url", "quality", "format", "max_dimension"})
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
_WEBHOOK_ID: Final = re.compile(r"wh_[0-9a-f]{1,64}\Z")
_SAFE_STEM: Final = re.compile(r"[^A-Za-z0-9._-]+")
_JSON_BODY_LIMIT: Final = 64 * 1024
_IMAGE_CACHE: Final = "public, max-age=31536000, immutable"
# With keys, shared caches must not hand one owner's image to another.
_PRIVATE_IMAGE_CACHE: Final = "private, max-age=31536000, immutable"


def iso_time(ts: float) -> str:
    """Format epoch seconds as ISO-8601 UTC (``2024-05-01T12:00:00.123456Z``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _error(status_code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status_code)


class _ApiError(Exception):
    """Raised by helpers to answer with a JSON error at once."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _request_id(raw: str) -> str:
    # Only canonical UUIDs reach the storage, so a malformed id is a plain
    # 404 and never a query with odd input.
    if _UUID.match(raw) is None:
        raise _ApiError(404, f"no request {raw[:64]!r}")
    return raw.lower()


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _ApiError(400, f"{name} must be a whole number, not {raw[:32]!r}") from None
    if not low <= value <= high:
        raise _ApiError(400, f"{name} must be between {low} and {high}, not {value}")
    return value


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'


def _etag_matches(header: str, etag: str) -> bool:
    """Weak comparison, as RFC 9110 prescribes for If-None-Match."""
    if header.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in header.split(","))


def _loggable(url: str) -> str:
    """A URL without userinfo and query string: receivers put tokens there."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _safe_key(key: str) -> bool:
    """Whether an image key is a plain relative path inside the store."""
    if not key or len(key) > 512 or "\\" in key or "\x00" in key or key.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


@attrs.define
class Lifespan:
    """Opens the engine and runs the in-process workers for the app's lifetime.

    An attrs class whose instance is the Starlette lifespan (as in
    ``svcs.starlette``): ``workers`` worker loops (the first also sweeps for
    lost items) and, when there is at least one, a single outbox loop.
    An engine handed in by the caller is opened but not closed.
    """

    engine: Engine
    workers: int = 1
    owns_engine: bool = True
    shutdown_grace: float = SHUTDOWN_GRACE

    async def _supervise(self, index: int, stop: anyio.Event) -> None:
        # A bug in one loop must not take the API down with it: log and
        # start the loop again after a pause.
        while not stop.is_set():
            try:
                await self.engine.run_worker(stop=stop, sweep=index == 0, deliver=False)
            except Exception:
                log.exception("worker loop %d crashed; restarting in 1 s", index)
                await anyio.sleep(1.0)

    async def _outbox(self) -> None:
        while True:
            try:
                await self.engine.run_outbox()
                return
            except Exception:
                log.exception("outbox loop crashed; restarting in 1 s")
                await anyio.sleep(1.0)

    async def _workers(self, stop: anyio.Event, done: anyio.Event) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for index in range(self.workers):
                    tg.start_soon(self._supervise, index, stop)
        finally:
            done.set()

    @contextlib.asynccontextmanager
    async def __call__(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        """Open the engine, start the loops, and stop them on shutdown."""
        engine = self.engine
        await engine.open()
        try:
            async with anyio.create_task_group() as tg:
                stop = anyio.Event()
                done = anyio.Event()
                if self.workers > 0:
                    tg.start_soon(self._workers, stop, done)
                    tg.start_soon(self._outbox)
                    log.info("started %d in-process worker loop(s)", self.workers)
                else:
                    done.set()
                yield {"engine": engine}
                # No new items are claimed from here; the ones in flight get
                # a moment to finish, then are cancelled and their leases
                # hand them to the next worker.
                stop.set()
                with anyio.move_on_after(self.shutdown_grace):
                    await done.wait()
                tg.cancel_scope.cancel()
        finally:
            if self.owns_engine:
                with anyio.CancelScope(shield=True):
                    await engine.close()


class _JsonErrors:
    """Turns any unexpected exception into ``500 {"error": "internal error"}``.

    Starlette's own 500 handler re-raises after answering, so the server
    would log the traceback a second time; here it is logged once, on the
    ``csvimg.server`` logger, and never sent to the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise  # a body is half sent: let the server abort the connection
            await _error(500, "internal error")(scope, receive, send)


@attrs.define
class _Api:
    """The route handlers, bound to one engine."""

    engine: Engine
    keys: ApiKeys | None = None
    metrics: Metrics = attrs.field(factory=Metrics)

    @property
    def settings(self) -> Settings:
        return self.engine.settings

    def base_url(self, request: Request) -> str:
        """Return the base of absolute URLs: ``CSVIMG_PUBLIC_URL``, else this request's host."""
        public = self.settings.public_url
        if public:
            return public.rstrip("/")
        return str(request.base_url).rstrip("/")

    def output_csv_url(self, job: Job, base: str) -> str | None:
        if not job.status.finished:
            return None
        return f"{base}/api/v1/requests/{job.id}/output.csv"

    def status_json(self, job: Job, base: str) -> dict[str, Any]:
        return {
            "request_id": job.id,
            "status": job.status.value,
            "progress": {"total": job.total, "done": job.done, "failed": job.failed},
            "created_at": iso_time(job.created_at),
            "updated_at": iso_time(job.updated_at),
            "output_csv_url": self.output_csv_url(job, base),
        }

    def item_json(self, item: Item, base: str) -> dict[str, Any]:
        return {
            "row": item.row,
            "position": item.position,
            "input_url": item.url,
            "output_url": self.engine.image_url(item, base),
            "status": item.status.value,
            "bytes_in": item.bytes_in,
            "bytes_out": item.bytes_out,
            "width": item.width,
            "height": item.height,
            "attempts": item.attempts,
            "error_code": item.error_code,
            "error_message": item.error_message,
        }

    def visible(self, job: Job, request: Request) -> bool:
        """Whether the caller may see *job*: always without keys, else only its owner."""
        return self.keys is None or job.owner == owner_of(request)

    async def job(self, raw_id: str, request: Request) -> Job:
        """The request *raw_id* if the caller may see it; the same 404 otherwise."""
        request_id = _request_id(raw_id)
        try:
            job = await self.engine.get_request(request_id)
        except NotFoundError:
            job = None
        if job is None or not self.visible(job, request):
            raise _ApiError(404, f"no request {request_id!r}")
        return job

    # -- upload -----------------------------------------------------------

    async def _checked_callback(self, url: str) -> str:
        """Validate a receiver URL: http(s), and an address the SSRF guard allows."""
        try:
            parts = check_url(url)
            assert parts.hostname is not None  # check_url refuses URLs without a host
            port = parts.port or (443 if parts.scheme == "https" else 80)
            await resolve_checked(parts.hostname, port, self.settings.fetch)
        except FetchError as exc:
            raise _ApiError(400, f"callback_url refused: {exc.code}: {exc.message}") from None
        return parts.geturl()

    def _options(self, fields: Mapping[str, str]) -> ProcessOptions:
        changes: dict[str, Any] = {}
        if raw := fields.get("quality", "").strip():
            try:
                changes["quality"] = int(raw)
            except ValueError:
                raise _ApiError(400, f"quality must be a whole number, not {raw[:32]!r}") from None
        if raw := fields.get("format", "").strip():
            fmt = raw.upper()
            fmt = "JPEG" if fmt == "JPG" else fmt
            formats = output_formats()
            if fmt not in formats:
                raise _ApiError(
                    400, f"format must be one of {', '.join(sorted(formats))}, not {raw[:32]!r}"
                )
            changes["format"] = fmt
        if raw := fields.get("max_dimension", "").strip():
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value < 1:
                raise _ApiError(
                    400, f"max_dimension must be a whole number of pixels, not {raw[:32]!r}"
                )
            changes["max_dimension"] = value
        try:
            return attrs.evolve(self.settings.options, **changes)
        except ValueError as exc:
            raise _ApiError(400, str(exc)) from None

    async def upload(self, request: Request) -> Response:
        """``POST /api/v1/upload``: validate a CSV and queue its images."""
        limit = self.settings.manifest.max_bytes
        upload: Upload | None = None
        try:
            check_declared_length(request.headers.get("content-length"), limit)
            upload = await read_upload(
                request.stream(),
                request.headers.get("content-type", ""),
                max_file_bytes=limit,
                allowed=_UPLOAD_FIELDS,
            )
            if upload.file is None:
                raise BadUpload("missing the 'file' field with the CSV")
            fields = upload.fields
            callback = fields.get("callback_url", "").strip() or None
            if callback is not None:
                callback = await self._checked_callback(callback)
            options = self._options(fields)
            try:
                job = await self.engine.submit(
                    upload.file,
                    callback_url=callback,
                    options=options,
                    owner=owner_of(request),
                    filename=upload.filename,
                )
            except ManifestError as exc:
                log.info("upload refused: %d problem(s) in %r", len(exc.errors), upload.filename,
                         extra={"owner": owner_of(request)})
                return _error(400, str(exc), errors=[p.to_dict() for p in exc.errors])
        except TooLarge as exc:
            response = _error(413, str(exc))
            if exc.close or "content-length" not in request.headers:
                # uvicorn would otherwise read and drop the whole body: the
                # declared one when that is huge, a chunked one with no end.
                response.headers["Connection"] = "close"
            return response
        except BadUpload as exc:
            return _error(400, str(exc))
        except ClientDisconnect:
            return _error(400, "the client went away during the upload")
        finally:
            if upload is not None:
                upload.close()
        base = self.base_url(request)
        self.metrics.requests_submitted.inc()
        log.info(
            "upload accepted: request %s, %d images, file %r",
            job.id, job.total, upload.filename,
            extra={"request_id": job.id, "owner": job.owner},
        )
        body: dict[str, Any] = {
            "request_id": job.id,
            "status_url": f"{base}/api/v1/status/{job.id}",
        }
        if job.callback_url:
            # The callback receiver needs this to verify the signatures; it is
            # derived, not stored, so it can only be shown here.
            body["callback_secret"] = request_secret(self.settings.webhook_secret, job.id)
        return JSONResponse(body)

    # -- reading ----------------------------------------------------------

    async def status(self, request: Request) -> Response:
        """``GET /api/v1/status/{request_id}``."""
        job = await self.job(request.path_params["request_id"], request)
        return JSONResponse(self.status_json(job, self.base_url(request)))

    async def items(self, request: Request) -> Response:
        """``GET /api/v1/requests/{request_id}/items``: per-image results, paginated."""
        offset = _int_param(request, "offset", 0, 0, 2**62)
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        job = await self.job(request.path_params["request_id"], request)
        items = await self.engine.storage.list_items(job.id, offset=offset, limit=limit)
        base = self.base_url(request)
        following = offset + len(items)
        next_url = (
            f"{base}/api/v1/requests/{job.id}/items?offset={following}&limit={limit}"
            if items and following < job.total
            else None
        )
        return JSONResponse(
            {
                "request_id": job.id,
                "offset": offset,
                "limit": limit,
                "total": job.total,
                "items": [self.item_json(i, base) for i in items],
                "next": next_url,
            }
        )

    async def output_csv(self, request: Request) -> Response:
        """``GET /api/v1/requests/{request_id}/output.csv``: 409 while running."""
        job = await self.job(request.path_params["request_id"], request)
        base = self.base_url(request)
        chunks = self.engine.output_csv(
            job.id, url_for=functools.partial(self.engine.image_url, base_url=base)
        )
        # The first chunk is read here, so "not finished" and storage errors
        # still become a JSON answer before any header is sent.
        try:
            first = await anext(chunks)
        except NotFinishedError as exc:
            return _error(409, f"the output CSV is not ready yet: {exc}", status=job.status.value)
        except StopAsyncIteration:  # pragma: no cover - the header row is always there
            first = b""

        async def body() -> AsyncIterator[bytes]:
            yield first
            async for chunk in chunks:
                yield chunk

        stem = PurePosixPath((job.filename or "").replace("\\", "/")).stem
        stem = _SAFE_STEM.sub("_", stem).strip("._")[:100] or job.id
        return StreamingResponse(
            body(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{stem}-output.csv"'},
        )

    async def deliveries(self, request: Request) -> Response:
        """``GET /api/v1/requests/{request_id}/deliveries``: webhook attempts."""
        job = await self.job(request.path_params["request_id"], request)
        found = await self.engine.storage.list_deliveries(job.id)
        return JSONResponse(
            {
                "request_id": job.id,
                "deliveries": [
                    {
                        "event_id": d.event_id,
                        "url": d.url,
                        "attempt": d.attempt,
                        "at": iso_time(d.at),
                        "status_code": d.status_code,
                        "error": d.error,
                    }
                    for d in found
                ],
            }
        )

    async def image(self, request: Request) -> Response:
        """``GET /api/v1/images/{key}``: an output image, cacheable for good."""
        key: str = request.path_params["key"]
        if not _safe_key(key) or not await self._image_visible(key, request):
            return _error(404, "no such image")
        try:
            info = await self.engine.blobs.stat(key)
        except (NotFoundError, ValueError):
            info = None  # a key the store itself refuses is as good as missing
        if info is None:
            return _error(404, "no such image")
        etag = _quote_etag(info.etag)
        cache = _IMAGE_CACHE if self.keys is None else _PRIVATE_IMAGE_CACHE
        headers = {"ETag": etag, "Cache-Control": cache}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and _etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        if info.path is not None:
            return FileResponse(info.path, media_type=info.content_type, headers=headers)
        try:
            data = await self.engine.blobs.get(key)
        except NotFoundError:
            return _error(404, "no such image")
        return Response(data, media_type=info.content_type, headers=headers)

    async def _image_visible(self, key: str, request: Request) -> bool:
        """With keys, an image is its request owner's: keys start with the request id."""
        if self.keys is None:
            return True
        request_id = key.split("/", 1)[0]
        if _UUID.match(request_id) is None:
            return False
        job = await self.engine.storage.get_request(request_id.lower())
        return job is not None and self.visible(job, request)

    # -- webhooks ---------------------------------------------------------

    async def add_webhook(self, request: Request) -> Response:
        """``POST /api/v1/webhook``: register a receiver; its secret is shown once."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _JSON_BODY_LIMIT:
                return _error(413, f"the JSON body is larger than {_JSON_BODY_LIMIT} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep (64 kB of "[")
            return _error(400, 'expected a JSON body like {"callback_url": "https://..."}')
        url = data.get("callback_url") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url.strip():
            return _error(400, "callback_url is required and must be a string")
        checked = await self._checked_callback(url.strip())
        owner = owner_of(request)
        webhook = Webhook(
            id="wh_" + secrets.token_hex(12), url=checked, secret=new_secret(), owner=owner
        )
        await self.engine.storage.add_webhook(webhook)
        log.info("webhook %s registered for %s", webhook.id, _loggable(checked),
                 extra={"webhook_id": webhook.id, "owner": owner})
        return JSONResponse(
            {
                "message": "Webhook registered successfully.",
                "id": webhook.id,
                "secret": webhook.secret,
                "callback_url": webhook.url,
            }
        )

    async def list_webhooks(self, request: Request) -> Response:
        """``GET /api/v1/webhook``: registrations, without their secrets."""
        hooks = await self.engine.storage.list_webhooks(owner=owner_of(request))
        return JSONResponse(
            {
                "webhooks": [
                    {
                        "id": h.id,
                        "callback_url": h.url,
                        "active": h.active,
                        "created_at": iso_time(h.created_at),
                    }
                    for h in hooks
                ]
            }
        )

    async def delete_webhook(self, request: Request) -> Response:
        """``DELETE /api/v1/webhook/{webhook_id}``."""
        webhook_id: str = request.path_params["webhook_id"]
        owner = owner_of(request)
        if _WEBHOOK_ID.match(webhook_id) is None or not await self.engine.storage.delete_webhook(
            webhook_id, owner=owner
        ):
            return _error(404, f"no webhook {webhook_id[:64]!r}")
        log.info("webhook %s deleted", webhook_id, extra={"webhook_id": webhook_id, "owner": owner})
        return JSONResponse({"message": "Webhook deleted.", "id": webhook_id})

    # -- operations -------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``: the process answers."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """``GET /readyz``: storage and queue answer (503 otherwise)."""
        checks = await self.engine.ready()
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    async def metrics_text(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text format (public, see `csvimg_server.metrics`)."""
        body = await self.metrics.render(self.engine)
        return Response(body, headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: Request) -> Response:
        """``GET /openapi.json``."""
        document = openapi_document(self.base_url(request), api_keys=self.keys is not None)
        return JSONResponse(document)


def _routes(api: _Api) -> list[Route]:
    return [
        Route("/api/v1/upload", api.upload, methods=["POST"], name="upload"),
        Route("/api/v1/status/{request_id}", api.status, methods=["GET"], name="status"),
        Route("/api/v1/requests/{request_id}/items", api.items, methods=["GET"], name="items"),
        Route(
            "/api/v1/requests/{request_id}/output.csv",
            api.output_csv,
            methods=["GET"],
            name="output_csv",
        ),
        Route(
            "/api/v1/requests/{request_id}/deliveries",
            api.deliveries,
            methods=["GET"],
            name="deliveries",
        ),
        Route(IMAGES_PATH + "{key:path}", api.image, methods=["GET"], name="image"),
        Route("/api/v1/webhook", api.add_webhook, methods=["POST"], name="add_webhook"),
        Route("/api/v1/webhook", api.list_webhooks, methods=["GET"], name="list_webhooks"),
        Route(
            "/api/v1/webhook/{webhook_id}",
            api.delete_webhook,
            methods=["DELETE"],
            name="delete_webhook",
        ),
        Route("/healthz", api.healthz, methods=["GET"], name="healthz"),
        Route("/readyz", api.readyz, methods=["GET"], name="readyz"),
        Route("/metrics", api.metrics_text, methods=["GET"], name="metrics"),
        Route("/openapi.json", api.openapi, methods=["GET"], name="openapi"),
    ]


def _allowed_methods(request: Request) -> set[str]:
    """Every method some route serves at this path (one path may have several routes)."""
    allowed: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "GET"})
            if match is not Match.NONE:
                allowed |= route.methods
    return allowed


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        # Starlette lists only the first route's methods.
        headers["Allow"] = ", ".join(sorted(allowed))
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _ApiError)
    return _error(exc.status, exc.message)


async def _storage_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s: storage failed: %s", request.method, request.url.path, exc)
    return _error(500, f"database error: {exc}")


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, str(exc))


async def _csvimg_error(request: Request, exc: Exception) -> Response:
    # Any other deliberate error of the library is still a server fault,
    # but one with a message worth showing.
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return _error(500, f"{type(exc).__name__}: {exc}")


def _api_keys(value: ApiKeys | str | Literal[FromEnv.FROM_ENV] | None) -> ApiKeys | None:
    if value is FROM_ENV:
        return ApiKeys.from_env()
    if isinstance(value, str):
        return ApiKeys.parse(value)
    return value


def create_app(
    settings: Settings | None = None,
    *,
    workers: int = 1,
    engine: Engine | None = None,
    shutdown_grace: float = SHUTDOWN_GRACE,
    api_keys: ApiKeys | str | Literal[FromEnv.FROM_ENV] | None = FROM_ENV,
) -> Starlette:
    """Build the csvimg HTTP API.

    *settings* default to `Settings.from_env` (``CSVIMG_*`` variables);
    alternatively hand in an *engine* (then *settings* must be None: the
    engine's own are used), which the app opens but does not close.
    *workers* in-process worker loops process queued images (0: API only,
    images are processed by ``csvimg worker`` processes elsewhere); on
    shutdown in-flight images get *shutdown_grace* seconds to finish.

    *api_keys* turns on API keys: an `ApiKeys`, or a ``CSVIMG_API_KEYS``
    value to parse (blank: off); None turns them off; by default the
    ``CSVIMG_API_KEYS`` environment variable decides. A malformed value
    raises `ConfigError`. The keys are registered with the log redaction
    filter (`csvimg_server.logs`). The app's metrics are in
    ``app.state.metrics``.
    """
    if workers < 0:
        raise ValueError(f"workers must not be negative, not {workers}")
    if engine is not None and settings is not None:
        raise ValueError("pass settings or an engine, not both")
    keys = _api_keys(api_keys)
    owns = engine is None
    if engine is None:
        engine = Engine(settings or Settings.from_env())
    metrics = Metrics()
    metrics.attach(engine)
    api = _Api(engine, keys=keys, metrics=metrics)
    routes = [*_routes(api), *ui_routes()]
    middleware = [
        Middleware(HttpMetrics, metrics=metrics),
        Middleware(_JsonErrors),
    ]
    if keys is not None:
        register_secrets(keys.secrets())
        middleware.append(Middleware(ApiKeyAuth, keys=keys))
        log.info("API keys on: %d key(s), owners %s", len(keys), ", ".join(sorted(keys.owners)))
    lifespan = Lifespan(engine, workers=workers, owns_engine=owns, shutdown_grace=shutdown_grace)
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HTTPException: _http_error,
            _ApiError: _api_error,
            StorageError: _storage_error,
            NotFoundError: _not_found,
            CsvimgError: _csvimg_error,
        },
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    return app
