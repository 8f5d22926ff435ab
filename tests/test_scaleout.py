"""Scale-out on Redis: one API-only server, three ``csvimg worker`` processes.

The issue's acceptance test: 300 real images, one worker ``kill -9``-ed in
the middle of the run; the request completes with every image done exactly
once, in the counters and in the output CSV.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from images import photo_jpeg
from server_helpers import ServeProcess, all_items, make_csv, wait_finished, wait_until
from servers import ImageHost
from services import redis_url

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

IMAGES = 300


@pytest.fixture
def redis_base() -> Iterator[tuple[str, str]]:
    """A Redis URL with a fresh key prefix; the keys are deleted afterwards."""
    url = redis_url()
    prefix = f"scaleout-{uuid.uuid4().hex[:8]}"
    yield url, prefix
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


def test_three_workers_one_killed(tmp_path: Path, redis_base: tuple[str, str]) -> None:
    url, prefix = redis_base
    backend = f"{url}?prefix={prefix}"
    bodies = [photo_jpeg(480 + 16 * i, 360, quality=90) for i in range(6)]
    with ImageHost() as host, httpx.Client(timeout=10) as client:
        # Each download takes a while, so the run lasts long enough to kill
        # a worker in the middle of it.
        for n in range(IMAGES):
            host.add(f"/p{n}.jpg", bodies[n % len(bodies)], content_type="image/jpeg", delay=0.15)
        rows = [
            [str(r + 1), f"SKU{r}", ",".join(host.url(f"/p{3 * r + k}.jpg") for k in range(3))]
            for r in range(IMAGES // 3)
        ]
        env = {
            "CSVIMG_FETCH_ALLOW": host.allow,
            "CSVIMG_STORAGE": backend,
            "CSVIMG_QUEUE": backend,
            "CSVIMG_BLOBS": f"file://{tmp_path / 'images'}",
            "CSVIMG_LEASE_SECONDS": "3",
            "CSVIMG_CONCURRENCY": "8",
        }
        data = tmp_path / "data"
        with ServeProcess(data, env=env, args=["--workers", "0"]) as api:
            api.wait_ready()
            workers = [
                ServeProcess(data, env=env, command="worker") for _ in range(3)
            ]
            try:
                response = client.post(
                    api.url + "/api/v1/upload",
                    files={"file": ("big.csv", make_csv(rows), "text/csv")},
                )
                assert response.status_code == 200, response.text
                request_id = response.json()["request_id"]

                def progress() -> int:
                    body = client.get(f"{api.url}/api/v1/status/{request_id}").json()
                    return int(body["progress"]["done"]) + int(body["progress"]["failed"])

                wait_until(lambda: progress() >= IMAGES // 5, timeout=60, what="a fifth done")
                victim = workers[0]
                victim.kill()  # kill -9 in the middle of the run
                assert progress() < IMAGES, "the run ended before the kill"

                status = wait_finished(client, api.url, request_id, timeout=120)
                assert status["status"] == "COMPLETED"
                assert status["progress"] == {"total": IMAGES, "done": IMAGES, "failed": 0}

                items = all_items(client, api.url, request_id)
                assert len(items) == IMAGES
                assert all(i["status"] == "DONE" for i in items)
                outputs = [i["output_url"] for i in items]
                assert len(set(outputs)) == IMAGES  # one output per image, no duplicates
                # attempts > 1 only for what the dead worker held
                retried = [i for i in items if i["attempts"] > 1]
                assert len(retried) <= 8 + 8  # its in-flight items (and claimed batch)

                out = client.get(status["output_csv_url"])
                assert out.status_code == 200
                table = list(csv.reader(io.StringIO(out.text)))
                assert len(table) == 1 + IMAGES // 3
                cells = [c for row in table[1:] for c in row[3].split(",")]
                assert cells == outputs  # same order, each exactly once, none empty
                for row in table[1:]:
                    assert len(row[2].split(",")) == len(row[3].split(",")) == 3

                # every image fetched at least once; only the killed worker's
                # in-flight downloads were fetched twice
                hits = Counter({p: host.hits[p] for p in (f"/p{n}.jpg" for n in range(IMAGES))})
                assert min(hits.values()) >= 1
                assert sum(hits.values()) - IMAGES <= 16

                sample = client.get(outputs[0])
                assert sample.status_code == 200
                assert sample.headers["content-type"] == "image/jpeg"
            finally:
                for w in workers:
                    if w.proc.poll() is None:
                        w.stop(timeout=30)
                api.stop()
