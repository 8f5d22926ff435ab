"""``GET /metrics``: Prometheus text from a per-app registry, after real work.

A real uvicorn processes a CSV (two images done, one 404) with a webhook
registered; the scrape must then show the request, item, byte, latency,
queue and delivery figures, and HTTP counts labelled by route template.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csvimg._errors import StorageError
from csvimg.backends.memory import MemoryQueue
from csvimg.engine import Engine
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.jobs import Delivery
from csvimg.settings import Settings
from csvimg_server import create_app
from csvimg_server.metrics import Metrics, delivery_outcome
from csvimg_server.openapi import OPENAPI
from server_helpers import (
    ThreadServer,
    check_response,
    make_csv,
    photo_host,
    wait_finished,
    wait_until,
)
from servers import ImageHost

__all__ = ["photo_host"]  # fixture, imported for pytest

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _settings(host: ImageHost) -> Settings:
    return Settings(
        fetch=FetchPolicy(allow=parse_allow(host.allow), retries=0),
        outbox_interval=0.1,
        webhook_schedule=(0.2, 0.2),
    )


def scrape(client: httpx.Client, base: str) -> Samples:
    """Every sample of ``/metrics``: (name, labels) -> value."""
    response = client.get(base + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    check_response(OPENAPI, "/metrics", "GET", response)
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of one sample (KeyError when absent)."""
    return samples[(name, frozenset(labels.items()))]


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of *name*, by label set."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def test_metrics_after_a_processed_request(photo_host: ImageHost, client: httpx.Client) -> None:
    photo_host.add("/hook", status=204)
    app = create_app(_settings(photo_host), workers=1, shutdown_grace=0.05, api_keys=None)
    with ThreadServer(app) as srv:
        before = scrape(client, srv.url)
        assert value(before, "csvimg_items_processed_total", status="done", error_code="") == 0
        assert value(before, "csvimg_fetch_duration_seconds_count") == 0

        client.post(srv.url + "/api/v1/webhook", json={"callback_url": photo_host.url("/hook")})
        body = make_csv([["1", "A", f"{photo_host.url('/a.jpg')},{photo_host.url('/b.jpg')}"],
                         ["2", "B", photo_host.url("/missing.jpg")]])
        response = client.post(srv.url + "/api/v1/upload",
                               files={"file": ("p.csv", body, "text/csv")})
        rid = response.json()["request_id"]
        assert wait_finished(client, srv.url, rid)["status"] == "COMPLETED"
        wait_until(
            lambda: value(scrape(client, srv.url), "csvimg_webhook_deliveries_total",
                          outcome="success") == 1,
            what="the delivery to be counted",
        )
        m = scrape(client, srv.url)

    assert value(m, "csvimg_requests_submitted_total") == 1
    assert value(m, "csvimg_requests_finished_total", status="COMPLETED") == 1
    assert value(m, "csvimg_requests_finished_total", status="FAILED") == 0
    assert value(m, "csvimg_items_processed_total", status="done", error_code="") == 2
    assert value(m, "csvimg_items_processed_total", status="failed", error_code="http-404") == 1
    assert value(m, "csvimg_item_bytes_in_total") > value(m, "csvimg_item_bytes_out_total") > 0

    # Latency histograms: every download timed (the 404 too), every encode.
    assert value(m, "csvimg_fetch_duration_seconds_count") == 3
    assert value(m, "csvimg_codec_duration_seconds_count") == 2
    assert value(m, "csvimg_fetch_duration_seconds_sum") > 0
    assert value(m, "csvimg_codec_duration_seconds_bucket", le="+Inf") == 2
    assert len(named(m, "csvimg_fetch_duration_seconds_bucket")) > 5

    assert value(m, "csvimg_queue_depth") == 0
    assert value(m, "csvimg_webhook_deliveries_total", outcome="success") == 1

    # HTTP requests by route template (one series for every status poll).
    assert value(m, "csvimg_http_requests_total",
                 method="POST", route="/api/v1/upload", status="200") == 1
    assert value(m, "csvimg_http_requests_total",
                 method="GET", route="/api/v1/status/{request_id}", status="200") >= 1
    assert value(m, "csvimg_http_request_duration_seconds_count",
                 method="POST", route="/api/v1/upload") == 1
    routes = {dict(labels)["route"] for labels in named(m, "csvimg_http_requests_total")}
    assert not any(rid in route for route in routes)


def test_queue_depth_is_read_at_scrape_time(photo_host: ImageHost, client: httpx.Client) -> None:
    app = create_app(_settings(photo_host), workers=0, api_keys=None)  # nothing takes items
    with ThreadServer(app) as srv:
        assert value(scrape(client, srv.url), "csvimg_queue_depth") == 0
        body = make_csv([["1", "A", f"{photo_host.url('/a.jpg')},{photo_host.url('/b.jpg')}"],
                         ["2", "B", photo_host.url("/c.png")]])
        client.post(srv.url + "/api/v1/upload", files={"file": ("p.csv", body, "text/csv")})
        assert value(scrape(client, srv.url), "csvimg_queue_depth") == 3


def test_metrics_are_public_and_count_refusals(client: httpx.Client) -> None:
    key = "k" * 32
    with ThreadServer(create_app(Settings(), workers=0, api_keys=f"ops:{key}")) as srv:
        assert client.get(f"{srv.url}/api/v1/status/{uuid.uuid4()}").status_code == 401
        assert client.get(srv.url + "/wp-login.php").status_code == 401
        m = scrape(client, srv.url)  # no key needed
    assert value(m, "csvimg_http_requests_total",
                 method="GET", route="/api/v1/status/{request_id}", status="401") == 1
    # Unknown paths share one label, so scanners cannot create series.
    assert value(m, "csvimg_http_requests_total",
                 method="GET", route="unmatched", status="401") == 1


def test_each_app_has_its_own_registry() -> None:
    first = create_app(Settings(), workers=0, api_keys=None)
    second = create_app(Settings(), workers=0, api_keys=None)
    assert first.state.metrics.registry is not second.state.metrics.registry
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("csvimg") for name in global_names)


class _DownQueue(MemoryQueue):
    async def depth(self) -> int:
        raise StorageError("the queue is down")


@pytest.mark.anyio
async def test_an_unreachable_queue_is_nan_not_an_error() -> None:
    metrics = Metrics()
    async with Engine(Settings(), queue=_DownQueue()) as engine:
        text = (await metrics.render(engine)).decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "csvimg_queue_depth"]
    assert math.isnan(family.samples[0].value)


@pytest.mark.parametrize(
    ("delivery", "outcome"),
    [
        ({"status_code": 204}, "success"),
        ({"status_code": 410, "error": "http-410"}, "http-4xx"),
        ({"status_code": 503, "error": "http-503"}, "http-5xx"),
        ({"error": "timeout: no answer in 15 s"}, "timeout"),
        ({"error": "blocked-address: 10.0.0.1"}, "blocked-address"),
        ({"error": "Something Odd: with spaces"}, "error"),
        ({}, "error"),
    ],
)
def test_delivery_outcome_labels(delivery: dict[str, Any], outcome: str) -> None:
    attempt = Delivery(event_id="e", url="https://example.com/", attempt=1, at=0.0, **delivery)
    assert delivery_outcome(attempt) == outcome
