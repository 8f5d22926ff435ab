"""``csvimg serve`` and ``csvimg worker`` as real processes.

End to end on the embedded default (SQLite + files + in-process workers),
a ``kill -9`` in the middle of a request followed by a restart, and a
standalone worker next to an API-only server, stopped with SIGTERM.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server_helpers import (
    ServeProcess,
    all_items,
    make_csv,
    photo_host,
    photo_jpeg,
    photos,
    wait_finished,
    wait_until,
)
from servers import ImageHost

__all__ = ["photo_host"]  # a fixture, imported for pytest

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


def test_serve_end_to_end(tmp_path: Path, photo_host: ImageHost) -> None:
    data = tmp_path / "data"
    host = photo_host
    rows = [
        ["1", "Shirt", f"{host.url('/a.jpg')},{host.url('/c.png')}"],
        ["2", "Mug", f"{host.url('/b.jpg')}, {host.url('/missing.jpg')} ,{host.url('/d.jpg')}"],
        ["3", "Hat", host.url("/d.jpg")],
    ]
    inputs = {path: body for path, (body, _) in photos().items()}
    with ServeProcess(data, env={"CSVIMG_FETCH_ALLOW": host.allow}) as server, \
            httpx.Client(timeout=10) as client:
        server.wait_ready()
        try:
            response = client.post(
                server.url + "/api/v1/upload",
                files={"file": ("catalogue.csv", make_csv(rows), "text/csv")},
            )
            assert response.status_code == 200, response.text
            request_id = response.json()["request_id"]
            status = wait_finished(client, server.url, request_id)
            assert status["status"] == "COMPLETED"
            assert status["progress"] == {"total": 6, "done": 5, "failed": 1}

            items = all_items(client, server.url, request_id)
            [bad] = [i for i in items if i["status"] == "FAILED"]
            assert bad["input_url"] == host.url("/missing.jpg")
            assert bad["error_code"] == "http-404" and bad["output_url"] is None

            output = client.get(status["output_csv_url"])
            assert output.status_code == 200
            table = list(csv.reader(io.StringIO(output.text)))
            assert table[0][-1] == "Output Image Urls"
            assert [r[:3] for r in table[1:]] == [
                [r[0], r[1], r[2]] for r in rows
            ]  # input rows unchanged, in order
            for row in table[1:]:
                inputs_of_row = [u.strip() for u in row[2].split(",")]
                outputs = row[3].split(",")
                assert len(outputs) == len(inputs_of_row)
                for input_url, output_url in zip(inputs_of_row, outputs, strict=True):
                    if input_url.endswith("/missing.jpg"):
                        assert output_url == ""
                        continue
                    image = client.get(output_url)
                    assert image.status_code == 200
                    assert image.headers["content-type"] == "image/jpeg"
                    original = inputs[input_url.removeprefix(host.base_url)]
                    assert len(image.content) < len(original)
                    with Image.open(io.BytesIO(original)) as src, \
                            Image.open(io.BytesIO(image.content)) as out:
                        out.load()
                        assert out.format == "JPEG" and out.size == src.size
            assert (data / "csvimg.db").is_file()
            assert len(list((data / "images").rglob("*.jpg"))) == 5
        finally:
            code = server.stop()
        assert code == 0, server.log()
        assert "upload accepted" in server.log()


def _slow_host(host: ImageHost, count: int, delay: float) -> list[str]:
    paths = []
    for n in range(count):
        path = f"/slow/{n}.jpg"
        host.add(path, photo_jpeg(160, 120, seed=n + 10), content_type="image/jpeg", delay=delay)
        paths.append(path)
    return paths


def test_kill_9_mid_request_then_restart_completes_exactly_once(
    tmp_path: Path, photo_host: ImageHost
) -> None:
    data = tmp_path / "data"
    total, concurrency = 10, 2
    paths = _slow_host(photo_host, total, delay=0.4)
    env = {"CSVIMG_FETCH_ALLOW": photo_host.allow, "CSVIMG_LEASE_SECONDS": "1.5"}
    # One worker, inside the server process: the kill takes all of it down.
    args = ["--concurrency", str(concurrency), "--workers", "1"]
    rows = [[str(n), f"P{n}", photo_host.url(p)] for n, p in enumerate(paths)]
    with httpx.Client(timeout=10) as client:
        with ServeProcess(data, env=env, args=args) as first:
            first.wait_ready()
            response = client.post(first.url + "/api/v1/upload",
                                   files={"file": ("slow.csv", make_csv(rows), "text/csv")})
            request_id = response.json()["request_id"]

            def some_done() -> bool:
                body = client.get(f"{first.url}/api/v1/status/{request_id}").json()
                return int(body["progress"]["done"]) >= 3

            wait_until(some_done, timeout=20, what="three images done")
            first.kill()  # kill -9: no shutdown, items in flight
        done_before = sum(photo_host.hits[p] for p in paths)
        assert done_before < total + concurrency

        with ServeProcess(data, env=env, args=args) as second:
            second.wait_ready()
            try:
                final = wait_finished(client, second.url, request_id, timeout=40)
                assert final["status"] == "COMPLETED"
                assert final["progress"] == {"total": total, "done": total, "failed": 0}
                items = all_items(client, second.url, request_id)
                assert [i["status"] for i in items] == ["DONE"] * total
                outputs = [i["output_url"] for i in items]
                assert len(set(outputs)) == total
                output = client.get(f"{second.url}/api/v1/requests/{request_id}/output.csv")
                table = list(csv.reader(io.StringIO(output.text)))
                assert [r[3] for r in table[1:]] == outputs  # each image once, in order
                for url in outputs:
                    assert client.get(url).status_code == 200
            finally:
                assert second.stop() == 0, second.log()
    # Every image was downloaded at least once; only the ones in flight at
    # the kill may have been downloaded twice: up to `concurrency` downloading,
    # plus those downloaded whose slot went to the next download (the backlog
    # of images waiting for a codec thread or the group commit), which on a
    # busy machine is one or two more.
    in_flight = 2 * concurrency
    hits = [photo_host.hits[p] for p in paths]
    assert min(hits) >= 1
    assert sum(hits) <= total + in_flight, hits
    assert len(list((data / "images").rglob("*.jpg"))) == total
    # At most one download per attempt, and only the items in flight at the
    # kill (a few ms from "claimed" to "requested" aside) had a second one.
    attempts = [int(i["attempts"]) for i in items]
    assert all(1 <= h <= a for h, a in zip(hits, attempts, strict=True)), (hits, attempts)
    assert 1 <= sum(attempts) - total <= in_flight, attempts


def test_worker_process_next_to_api_only_server(tmp_path: Path, photo_host: ImageHost) -> None:
    data = tmp_path / "data"
    photo_host.add("/slow.jpg", photo_jpeg(200, 150, seed=99), content_type="image/jpeg",
                   delay=1.5)
    env = {"CSVIMG_FETCH_ALLOW": photo_host.allow}
    rows = [
        ["1", "A", f"{photo_host.url('/a.jpg')},{photo_host.url('/b.jpg')}"],
        ["2", "B", photo_host.url("/c.png")],
    ]
    with httpx.Client(timeout=10) as client, \
            ServeProcess(data, env=env, args=["--workers", "0"]) as api:
        api.wait_ready()
        try:
            first = client.post(api.url + "/api/v1/upload",
                                files={"file": ("a.csv", make_csv(rows), "text/csv")})
            first_id = first.json()["request_id"]
            time.sleep(0.3)
            pending = client.get(f"{api.url}/api/v1/status/{first_id}").json()
            assert pending["status"] == "PENDING"  # nobody processes with --workers 0

            with ServeProcess(data, env=env, command="worker") as worker:
                assert wait_finished(client, api.url, first_id)["status"] == "COMPLETED"

                # SIGTERM with an image in flight: it is finished, then exit 0.
                slow = client.post(
                    api.url + "/api/v1/upload",
                    files={"file": ("s.csv", make_csv([["1", "S", photo_host.url("/slow.jpg")]]),
                                    "text/csv")},
                )
                slow_id = slow.json()["request_id"]
                wait_until(lambda: photo_host.hits["/slow.jpg"] >= 1, what="the slow download")
                # One SIGTERM (stop() sends it): a second one means "stop now".
                assert worker.stop(timeout=20) == 0, worker.log()
                log = worker.log()
                assert "SIGTERM" in log and "worker stopped" in log
            status = client.get(f"{api.url}/api/v1/status/{slow_id}").json()
            assert status["status"] == "COMPLETED", log
        finally:
            assert api.stop() == 0, api.log()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_serve_runs_extra_workers_as_child_processes(
    tmp_path: Path, photo_host: ImageHost
) -> None:
    data = tmp_path / "data"
    env = {"CSVIMG_FETCH_ALLOW": photo_host.allow}
    rows = [[str(n), f"P{n}", photo_host.url("/a.jpg")] for n in range(6)]
    with httpx.Client(timeout=10) as client:
        with ServeProcess(data, env=env, args=["--workers", "3"]) as server:
            server.wait_ready()
            wait_until(lambda: len(_children(server.proc.pid)) == 2, what="two worker children")
            kids = _children(server.proc.pid)
            response = client.post(server.url + "/api/v1/upload",
                                   files={"file": ("k.csv", make_csv(rows), "text/csv")})
            request_id = response.json()["request_id"]
            final = wait_finished(client, server.url, request_id)
            assert final["progress"] == {"total": 6, "done": 6, "failed": 0}
            assert server.stop() == 0, server.log()
            assert not any(_alive(k) for k in kids)  # stopped with the server
            assert "started 2 worker process(es)" in server.log()

        # A server killed with SIGKILL takes its children with it.
        with ServeProcess(data, env=env, args=["--workers", "2"]) as server:
            server.wait_ready()
            wait_until(lambda: len(_children(server.proc.pid)) == 1, what="a worker child")
            [kid] = _children(server.proc.pid)
            server.kill()
            wait_until(lambda: not _alive(kid), timeout=30, what="the orphan to stop")
