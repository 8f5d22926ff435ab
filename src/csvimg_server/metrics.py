"""Prometheus metrics of the server: ``GET /metrics``.

Each app has its own `prometheus_client.CollectorRegistry` (never the
global one), so several apps in one process do not clash. What is
exported (``rate()`` of a counter gives the per-second figure, e.g.
``rate(csvimg_items_processed_total[1m])`` is items/s)::

    csvimg_requests_submitted_total                    uploads accepted by this process
    csvimg_requests_finished_total{status}             COMPLETED / FAILED (in-process workers)
    csvimg_items_processed_total{status,error_code}    done / failed ("" when done)
    csvimg_item_bytes_in_total, csvimg_item_bytes_out_total
    csvimg_fetch_duration_seconds                      histogram, one per download
    csvimg_codec_duration_seconds                      histogram, one per decode+encode
    csvimg_queue_depth                                 ids waiting or leased, at scrape time
    csvimg_webhook_deliveries_total{outcome}           success, http-4xx, http-5xx, or the
                                                       fetch error code (timeout...)
    csvimg_http_requests_total{method,route,status}    by route template, not by path
    csvimg_http_request_duration_seconds{method,route} histogram

Item, request-finished and delivery figures count the work of the
in-process workers (``csvimg serve --workers N``); ``csvimg worker``
processes do not serve metrics. The queue depth is the queue's own count,
so it covers every worker.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from typing import Final

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csvimg.engine import Engine
from csvimg.jobs import Delivery, Item, ItemResult, Request, RequestStatus

__all__ = ["CONTENT_TYPE", "HttpMetrics", "Metrics", "delivery_outcome"]

log = logging.getLogger("csvimg.server")

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of the Prometheus text format."""

_FETCH_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_CODEC_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LABEL: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,39}\Z")
_DEPTH_TIMEOUT: Final = 5.0
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _code_label(code: str | None, default: str) -> str:
    """An error code fit for a label: a short slug, else *default* (bounded cardinality)."""
    return code if code is not None and _LABEL.match(code) else default


def delivery_outcome(delivery: Delivery) -> str:
    """Label one webhook attempt: ``success``, ``http-4xx``, ``http-5xx`` or an error code."""
    if delivery.ok:
        return "success"
    if delivery.status_code is not None:
        return f"http-{delivery.status_code // 100}xx"
    return _code_label((delivery.error or "").split(":", 1)[0].strip(), "error")


class Metrics:
    """The metrics of one app, in their own registry; see the module docstring."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_submitted = Counter(
            "csvimg_requests_submitted", "Uploads accepted by this process.", registry=r
        )
        self.requests_finished = Counter(
            "csvimg_requests_finished",
            "Requests finished by this process's workers, by final status.",
            ["status"], registry=r,
        )
        self.items = Counter(
            "csvimg_items_processed",
            "Images processed by this process's workers, by status and error code.",
            ["status", "error_code"], registry=r,
        )
        self.bytes_in = Counter(
            "csvimg_item_bytes_in", "Bytes of the source images processed.", registry=r
        )
        self.bytes_out = Counter(
            "csvimg_item_bytes_out", "Bytes of the compressed images written.", registry=r
        )
        self.fetch_seconds = Histogram(
            "csvimg_fetch_duration_seconds", "Time to download one image (failures included).",
            buckets=_FETCH_BUCKETS, registry=r,
        )
        self.codec_seconds = Histogram(
            "csvimg_codec_duration_seconds", "Time to decode and encode one image.",
            buckets=_CODEC_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "csvimg_queue_depth", "Item ids waiting or leased in the queue (NaN: unreachable).",
            registry=r,
        )
        self.deliveries = Counter(
            "csvimg_webhook_deliveries", "Webhook delivery attempts, by outcome.",
            ["outcome"], registry=r,
        )
        self.http_requests = Counter(
            "csvimg_http_requests", "HTTP requests answered, by route template and status.",
            ["method", "route", "status"], registry=r,
        )
        self.http_seconds = Histogram(
            "csvimg_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["method", "route"], registry=r,
        )
        # Series that dashboards expect to exist start at zero.
        for status in (RequestStatus.COMPLETED, RequestStatus.FAILED):
            self.requests_finished.labels(status=status.value)
        self.items.labels(status="done", error_code="")
        self.deliveries.labels(outcome="success")

    def attach(self, engine: Engine) -> None:
        """Subscribe to *engine*'s item, timing and request events and its notifier's."""
        engine.on_item(self.item_finished)
        engine.on_timing(self.timing)
        engine.on_request_finished(self.request_finished)
        on_delivery = getattr(engine.notifier, "on_delivery", None)
        if callable(on_delivery):
            on_delivery(self.delivery)

    # -- engine callbacks (sync, called on the event loop) -------------------

    def item_finished(self, item: Item, result: ItemResult) -> None:
        """Count one processed image."""
        if result.ok:
            self.items.labels(status="done", error_code="").inc()
            self.bytes_out.inc(result.bytes_out or 0)
        else:
            code = _code_label(result.error_code, "other")
            self.items.labels(status="failed", error_code=code).inc()
        self.bytes_in.inc(result.bytes_in or 0)

    def timing(self, stage: str, seconds: float) -> None:
        """Observe one fetch or codec step (other stages are ignored)."""
        if stage == "fetch":
            self.fetch_seconds.observe(seconds)
        elif stage == "codec":
            self.codec_seconds.observe(seconds)

    def request_finished(self, request: Request) -> None:
        """Count a request reaching COMPLETED or FAILED."""
        self.requests_finished.labels(status=request.status.value).inc()

    def delivery(self, delivery: Delivery) -> None:
        """Count one webhook attempt by outcome."""
        self.deliveries.labels(outcome=delivery_outcome(delivery)).inc()

    # -- scraping -------------------------------------------------------------

    async def render(self, engine: Engine) -> bytes:
        """Refresh the scrape-time gauges, then return the text exposition.

        Collectors are synchronous, so the queue depth (an async call) is
        read here, before generating.
        """
        try:
            with anyio.fail_after(_DEPTH_TIMEOUT):
                depth: float = await engine.queue_depth()
        except Exception as exc:  # an unreachable queue must not break the scrape
            log.warning("metrics: queue depth unavailable: %s", exc)
            depth = math.nan
        self.queue_depth.set(depth)
        return generate_latest(self.registry)


def _template(scope: Scope) -> str:
    """The route template that answered (or would answer) *scope*."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Not routed (e.g. refused by the auth middleware first): match here,
    # against the app's live route list (routes may be added after creation).
    routes: Sequence[BaseRoute] = getattr(scope.get("app"), "routes", ())
    partial: str | None = None
    for candidate in routes:
        match, _ = candidate.matches(scope)
        candidate_path = getattr(candidate, "path", None)
        if not isinstance(candidate_path, str):
            continue
        if match is Match.FULL:
            return candidate_path
        if match is Match.PARTIAL and partial is None:
            partial = candidate_path
    # Unknown paths share one label, so scanners cannot blow up the series.
    return partial or "unmatched"


class HttpMetrics:
    """ASGI middleware counting and timing HTTP requests by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request and record its status once the app is done."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            method = str(scope.get("method", ""))
            method = method if method in _METHODS else "other"
            route = _template(scope)
            self.metrics.http_requests.labels(
                method=method, route=route, status=str(status)
            ).inc()
            self.metrics.http_seconds.labels(method=method, route=route).observe(
                time.perf_counter() - started
            )
