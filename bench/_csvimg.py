"""Driving the product: ``csvimg serve`` / ``csvimg worker`` processes and uploads.

`Serve` starts ``python -m csvimg_server serve`` on a free 127.0.0.1 port
(embedded default unless told otherwise: SQLite + file blobs in a fresh
data folder, in-process workers), with ``CSVIMG_FETCH_ALLOW`` set to the
bench's image host only and logging at ``warning`` (no access log: the
bench measures the product, not its log volume). `run_batch` uploads a
CSV and times upload -> ``COMPLETED`` from the client's side.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx

from bench._proc import (
    Proc,
    Stoppable,
    descendants,
    free_port,
    proc_status_kb,
    tree_cpu_seconds,
    tree_status_kb,
    wait_http,
)

__all__ = ["BatchResult", "Serve", "Worker", "make_csv", "product_env"]

HEADER = ("S. No.", "Product Name", "Input Image Urls")


def product_env(allow: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a product process: this one's, minus CSVIMG_*, plus *allow*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSVIMG_")}
    env["CSVIMG_FETCH_ALLOW"] = allow
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def make_csv(urls: Sequence[str], per_row: int = 1) -> bytes:
    """A manifest with *per_row* URLs in each row's cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for row, start in enumerate(range(0, len(urls), per_row), start=1):
        writer.writerow((row, f"SKU{row:07d}", ",".join(urls[start : start + per_row])))
    return buf.getvalue().encode()


@attrs.frozen
class BatchResult:
    request_id: str
    images: int
    seconds: float
    upload_seconds: float
    cpu_seconds: float
    """CPU (user + system) the server process used during the batch."""
    done: int
    failed: int
    status: str

    @property
    def per_second(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_seconds / self.images

    @property
    def cores_busy(self) -> float:
        return self.cpu_seconds / self.seconds


class Serve(Stoppable):
    """``csvimg serve`` in its own process group; stopped on exit."""

    def __init__(
        self,
        work: Path,
        *,
        allow: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str = "serve",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = work / f"{name}-{self.port}"
        self.env = product_env(allow, env)
        argv = [
            sys.executable,
            "-m",
            "csvimg_server",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "warning",
            *args,
        ]
        self.proc = Proc(argv, env=self.env, log_path=work / f"{name}-{self.port}.log", name=name)
        self.client = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0))
        try:
            wait_http(self.url + "/healthz", self.proc, timeout=60)
        except BaseException:
            self.stop()
            raise

    # -- memory and CPU ---------------------------------------------------
    # `csvimg serve` may run worker processes as its children: CPU and
    # memory are read for the whole process tree.

    def hwm_mb(self) -> float:
        """Peak RSS (``VmHWM``) of the largest process of the server's tree, MB."""
        return max(self.hwm_by_pid().values()) / 1024

    def api_hwm_mb(self) -> float:
        """Peak RSS of the server process itself (the API), MB."""
        return proc_status_kb(self.proc.pid, "VmHWM") / 1024

    def hwm_by_pid(self) -> dict[int, int]:
        """``VmHWM`` in kB of the server process and of each worker child."""
        return tree_status_kb(self.proc.pid, "VmHWM")

    def processes(self) -> int:
        return len(self.hwm_by_pid())

    def wait_workers(self, timeout: float = 60.0) -> None:
        """Wait until every worker child has opened the database (its loop starts).

        `csvimg serve` answers HTTP before its ``csvimg worker`` children have
        imported everything (a second or two on a slow machine): a batch
        started earlier would measure their start-up as well.
        """
        db = str(self.data_dir / "csvimg.db")
        deadline = time.monotonic() + timeout
        while True:
            children = [pid for pid in descendants(self.proc.pid) if _is_worker(pid)]
            if all(_has_open(pid, db) for pid in children):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker processes {children} did not open {db} in {timeout} s")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """CPU seconds of the server and its worker children so far."""
        return tree_cpu_seconds(self.proc.pid)

    # -- API ---------------------------------------------------------------

    def upload(self, csv_bytes: bytes, **fields: str) -> tuple[str, float]:
        """POST the CSV; return (request_id, seconds until the answer)."""
        start = time.perf_counter()
        response = self.client.post(
            self.url + "/api/v1/upload",
            files={"file": ("bench.csv", csv_bytes, "text/csv")},
            data=fields,
        )
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(
                f"upload failed: {response.status_code} {response.text[:500]}\n"
                f"{self.proc.log_tail()}"
            )
        return str(response.json()["request_id"]), elapsed

    def status(self, request_id: str) -> dict[str, Any]:
        response = self.client.get(f"{self.url}/api/v1/status/{request_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def wait(self, request_id: str, timeout: float, poll: float = 0.05) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.status(request_id)
            if body["status"] in ("COMPLETED", "FAILED"):
                return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id} unfinished after {timeout:g} s: {body}")
            if not self.proc.alive():
                raise RuntimeError(f"server died:\n{self.proc.log_tail()}")
            time.sleep(poll)

    def items(self, request_id: str) -> list[dict[str, Any]]:
        url: str | None = f"{self.url}/api/v1/requests/{request_id}/items?limit=1000"
        out: list[dict[str, Any]] = []
        while url:
            page = self.client.get(url)
            page.raise_for_status()
            out.extend(page.json()["items"])
            url = page.json()["next"]
        return out

    def run_batch(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 900.0,
        per_row: int = 1,
        allow_failures: bool = False,
    ) -> BatchResult:
        """Upload *urls* as one CSV and wait for it; time from upload to finished."""
        body = make_csv(urls, per_row)
        cpu_before = self.cpu_seconds()
        start = time.perf_counter()
        request_id, upload_seconds = self.upload(body)
        status = self.wait(request_id, timeout)
        elapsed = time.perf_counter() - start
        cpu = self.cpu_seconds() - cpu_before
        progress = status["progress"]
        result = BatchResult(
            request_id=request_id,
            images=len(urls),
            seconds=elapsed,
            upload_seconds=upload_seconds,
            cpu_seconds=cpu,
            done=progress["done"],
            failed=progress["failed"],
            status=status["status"],
        )
        if result.failed and not allow_failures:
            errors = {
                f"{i['error_code']}: {i['error_message']}"
                for i in self.items(request_id)
                if i["error_code"]
            }
            raise RuntimeError(
                f"{result.failed} of {len(urls)} images failed: {sorted(errors)[:3]}"
            )
        return result

    def stop(self) -> None:
        """Stop the server and its workers; delete its data, keep its log."""
        self.client.close()
        self.proc.stop()
        # The output images of a full run take a GB or more: keep only the log.
        shutil.rmtree(self.data_dir, ignore_errors=True)


class Worker:
    """``csvimg worker`` in its own process group."""

    def __init__(
        self,
        work: Path,
        *,
        allow: str,
        args: Sequence[str] = (),
        name: str = "worker",
        env: Mapping[str, str] | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "csvimg_server", "worker", "--log-level", "warning", *args]
        self.proc = Proc(
            argv, env=product_env(allow, env), log_path=work / f"{name}.log", name=name
        )

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        self.proc.stop()


def _has_open(pid: int, path: str) -> bool:
    """Whether process *pid* holds *path* open (a gone process counts as done)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"\0worker\0" in f.read()
    except OSError:
        return False
