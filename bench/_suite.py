"""The measurements of issue 6, each against a baseline taken in the same run.

=========== ==================================================================
name        what
=========== ==================================================================
codec       plain-Pillow ceiling vs ``csvimg serve`` end to end, per image size
            (the 12 MP run also gives the worker's peak memory)
latency     image host adds 200 ms per response: throughput vs
            0.8 x min(ceiling, concurrency / latency)
ingest      100,000 rows / 300,000 URLs: upload -> request_id vs csv.reader +
            sqlite executemany; the server's peak RSS growth
status      ``GET /api/v1/status/{id}`` req/s vs ``GET /healthz`` on the same server
memory      12 MP at full concurrency under 400 MB; decompression bombs refused
            with under 50 MB extra
scaleout    1, 2, 4 ``csvimg worker`` processes on Redis, vs 1 worker
=========== ==================================================================
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from bench._ceiling import ceiling, cores
from bench._csvimg import Serve, Worker
from bench._images import ImageSet, make_images
from bench._loadgen import run_load
from bench._proc import Proc
from bench._report import Results, Row
from bench._static import StaticServer

__all__ = ["MEASUREMENTS", "Config", "run"]

CONCURRENCY = 32
"""Items in flight per worker loop (the product's default, passed explicitly)."""


@attrs.define
class Counts:
    ceiling: dict[str, int]
    e2e: dict[str, int]
    warmup: int
    latency_images: int
    ingest_rows: int
    status_seconds: float
    status_rounds: int
    scaleout_images: int
    bomb_copies: int
    memory_images: int


FULL = Counts(
    ceiling={"0.3MP-jpeg": 4000, "2MP-jpeg": 1000, "12MP-jpeg": 150, "2MP-png": 300},
    e2e={"0.3MP-jpeg": 8000, "2MP-jpeg": 2000, "12MP-jpeg": 300, "2MP-png": 400},
    warmup=64,
    latency_images=500,
    ingest_rows=100_000,
    status_seconds=5.0,
    status_rounds=2,
    scaleout_images=800,
    bomb_copies=8,
    memory_images=2 * CONCURRENCY,
)
QUICK = Counts(
    ceiling={"0.3MP-jpeg": 300, "2MP-jpeg": 80, "12MP-jpeg": 12, "2MP-png": 30},
    e2e={"0.3MP-jpeg": 300, "2MP-jpeg": 100, "12MP-jpeg": 40, "2MP-png": 40},
    warmup=16,
    latency_images=100,
    ingest_rows=10_000,
    status_seconds=2.0,
    status_rounds=1,
    scaleout_images=60,
    bomb_copies=4,
    memory_images=40,
)
SMOKE = Counts(
    ceiling={"0.3MP-jpeg": 8},
    e2e={"0.3MP-jpeg": 3},
    warmup=0,
    latency_images=3,
    ingest_rows=50,
    status_seconds=0.5,
    status_rounds=1,
    scaleout_images=3,
    bomb_copies=1,
    memory_images=2,
)

E2E_TARGETS = {"0.3MP-jpeg": 0.75, "2MP-jpeg": 0.80, "12MP-jpeg": 0.75, "2MP-png": 0.75}
LABELS = {
    "0.3MP-jpeg": "0.3 MP JPEG",
    "2MP-jpeg": "2 MP JPEG",
    "12MP-jpeg": "12 MP JPEG",
    "2MP-png": "2 MP PNG",
}


@attrs.define
class Config:
    """Options of one run (see ``python -m bench --help``)."""

    work: Path
    counts: Counts = QUICK
    sizes: tuple[str, ...] = ("0.3MP-jpeg", "2MP-jpeg", "12MP-jpeg", "2MP-png")
    static: str = "auto"
    loadgen: str = "auto"
    profile: str | None = None
    """None, "all" (samples of running threads), "gil" (only those holding the GIL) or
    "wall" (waiting threads too: where an item's time goes)."""
    redis_url: str = "redis://127.0.0.1:6379/14"
    latency: float = 0.2
    per_size: int = 6
    env: dict[str, str] = attrs.field(factory=dict)
    """Extra environment for the product processes (e.g. PILLOW_BLOCKS_MAX)."""


@attrs.define
class Context:
    config: Config
    run_dir: Path
    """Scratch of this run (servers' data and logs): ``<work>/last-run``, emptied first."""
    results: Results
    images_root: Path
    sets: dict[str, ImageSet]
    static: StaticServer
    ceilings: dict[str, float] = attrs.field(factory=dict)
    ceiling_cpu: dict[str, float] = attrs.field(factory=dict)
    """CPU ms per image of the plain-Pillow transcode, per image set."""

    @property
    def work(self) -> Path:
        return self.run_dir

    @property
    def cores(self) -> int:
        return cores()

    @property
    def allow(self) -> str:
        return f"127.0.0.1:{self.static.port}"

    def urls(self, set_name: str, count: int, base: str | None = None) -> list[str]:
        """*count* distinct URLs cycling through the files of a set."""
        paths = self.sets[set_name].paths
        root = base or self.static.url
        tag = uuid.uuid4().hex[:8]
        return [f"{root}/{paths[n % len(paths)]}?n={tag}-{n}" for n in range(count)]

    def serve(self, *args: str, name: str = "serve", env: dict[str, str] | None = None) -> Serve:
        return Serve(
            self.work,
            allow=self.allow,
            args=args,
            name=name,
            env={**self.config.env, **(env or {})},
        )

    def warm(self, server: Serve) -> None:
        server.wait_workers()
        n = self.config.counts.warmup
        if n:
            server.run_batch(self.urls("0.3MP-jpeg", n))

    def ceiling_of(self, set_name: str) -> float:
        if set_name not in self.ceilings:
            paths = [self.images_root / p for p in self.sets[set_name].paths]
            got = ceiling(paths, self.config.counts.ceiling.get(set_name, 8))
            self.ceilings[set_name] = got.per_second
            self.ceiling_cpu[set_name] = min(
                got.cpu_ms_per_image, self.ceiling_cpu.get(set_name, float("inf"))
            )
        return self.ceilings[set_name]


# ---------------------------------------------------------------- profiling


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    return found


@contextlib.contextmanager
def profiled(ctx: Context, pid: int, name: str) -> Iterator[Path | None]:
    """Record a py-spy profile of *pid* while the block runs (with ``--profile``)."""
    if not ctx.config.profile:
        yield None
        return
    out = ctx.work / "profiles" / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = Proc(
        [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--threads",
            "--subprocesses",
            "-o",
            str(out),
            *({"gil": ["--gil"], "wall": ["--idle"]}.get(ctx.config.profile or "", [])),
        ],
        log_path=out.with_suffix(".log"),
        name="py-spy",
    )
    try:
        yield out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(30)
        proc.stop()
        if out.exists():
            ctx.results.notes.append(f"profile of {name}: `{out}` (py-spy raw/collapsed stacks)")


# ------------------------------------------------------------ measurements


def measure_codec(ctx: Context) -> None:
    """Ceiling vs end to end per size; the 12 MP server's peak memory too."""
    counts = ctx.config.counts
    for set_name in ctx.config.sizes:
        if set_name not in counts.e2e or set_name not in ctx.sets:
            continue
        label = LABELS.get(set_name, set_name)
        before = ctx.ceiling_of(set_name)
        with ctx.serve("--concurrency", str(CONCURRENCY), name=f"serve-{set_name}") as server:
            ctx.warm(server)
            urls = ctx.urls(set_name, counts.e2e[set_name])
            with profiled(ctx, server.proc.pid, f"e2e-{set_name}"):
                result = server.run_batch(urls)
            hwm = server.hwm_mb()
            processes = server.processes()
        # The ceiling again after, and the mean of both: the machine may have
        # got busier or quieter while the product ran.
        ctx.ceilings.pop(set_name)
        after = ctx.ceiling_of(set_name)
        ceil = (before + after) / 2
        ctx.ceilings[set_name] = ceil
        ratio = result.per_second / ceil
        target = E2E_TARGETS.get(set_name, 0.75)
        ctx.results.point("ceiling", label, ceil)
        ctx.results.point("e2e", label, result.per_second)
        ctx.results.add(
            Row(
                "codec ceiling",
                f"{label}, {result.images} images",
                f"{result.per_second:.1f} img/s",
                f"{ceil:.1f} img/s ({before:.0f} / {after:.0f})",
                ratio,
                f">= {target:.2f}",
                ratio >= target,
                note=f"server ({processes} process{'es' if processes > 1 else ''}): "
                f"{result.cpu_ms_per_image:.1f} ms CPU/image, "
                f"{result.cores_busy:.2f} of {ctx.cores} cores busy, "
                f"peak RSS {hwm:.0f} MB (largest process); "
                f"plain Pillow: {ctx.ceiling_cpu[set_name]:.1f} ms CPU/image",
            )
        )
        if set_name == "12MP-jpeg":
            _memory_row(ctx, hwm, result.images, processes)


def _memory_row(ctx: Context, hwm: float, images: int, processes: int) -> None:
    ctx.results.add(
        Row(
            "memory",
            f"12 MP JPEG, concurrency {CONCURRENCY}, {images} images",
            f"{hwm:.0f} MB peak RSS",
            "limit 400 MB",
            None,
            "< 400 MB",
            hwm < 400,
            note=f"largest VmHWM of the {processes} processes of `csvimg serve` (the server, "
            "API + worker loop, and its `csvimg worker` children)",
        )
    )


def measure_memory(ctx: Context) -> None:
    """Bombs refused cheaply; (when codec did not run) 12 MP peak RSS."""
    counts = ctx.config.counts
    if not any(r.measure == "memory" for r in ctx.results.rows) and "12MP-jpeg" in ctx.sets:
        with ctx.serve("--concurrency", str(CONCURRENCY), name="serve-mem12") as server:
            result = server.run_batch(ctx.urls("12MP-jpeg", counts.memory_images))
            _memory_row(ctx, server.hwm_mb(), result.images, server.processes())
    with ctx.serve("--concurrency", str(CONCURRENCY), name="serve-bomb") as server:
        # Normal work first, so the "before" peak includes an ordinary batch.
        server.run_batch(ctx.urls("0.3MP-jpeg", max(4, counts.warmup)))
        before = server.hwm_by_pid()
        urls = ctx.urls("bombs", 2 * counts.bomb_copies)
        result = server.run_batch(urls, allow_failures=True)
        after = server.hwm_by_pid()
        codes = {i["error_code"] for i in server.items(result.request_id)}
    # The largest growth of any one process (each worker may take some bombs).
    extra = max((after[p] - before.get(p, after[p])) for p in after) / 1024
    before_mb = max(before.values()) / 1024
    refused = result.failed == len(urls) and codes == {"too-many-pixels"}
    ctx.results.add(
        Row(
            "memory",
            f"decompression bombs x{len(urls)} (100 MP PNG, 3.6 GP JPEG header)",
            f"+{extra:.1f} MB peak RSS",
            f"{before_mb:.0f} MB before (largest process)",
            None,
            "< 50 MB extra",
            extra < 50 and refused,
            note=(
                "all refused as too-many-pixels"
                if refused
                else f"NOT all refused: {result.failed}/{len(urls)} failed, codes {sorted(codes)}"
            ),
        )
    )


def measure_latency(ctx: Context) -> None:
    """A slow image host: downloads must overlap."""
    counts = ctx.config.counts
    set_name = "0.3MP-jpeg"
    latency = ctx.config.latency
    ceil = ctx.ceiling_of(set_name)
    with StaticServer(ctx.images_root, ctx.work, latency=latency, kind=ctx.config.static) as slow:
        allow = f"127.0.0.1:{ctx.static.port},127.0.0.1:{slow.port}"
        with Serve(
            ctx.work,
            allow=allow,
            args=("--concurrency", str(CONCURRENCY)),
            name="serve-latency",
            env=ctx.config.env,
        ) as server:
            ctx.warm(server)
            # One worker loop per process (`csvimg serve` runs its extra
            # workers as children), each with CONCURRENCY items in flight.
            loops = server.processes()
            urls = ctx.urls(set_name, counts.latency_images, base=slow.url)
            with profiled(ctx, server.proc.pid, "latency"):
                result = server.run_batch(urls)
    in_flight = CONCURRENCY * loops
    bound = min(ceil, in_flight / latency)
    ratio = result.per_second / bound
    ctx.results.add(
        Row(
            "latency-bound",
            f"0.3 MP JPEG, +{latency * 1000:.0f} ms/response, {result.images} images",
            f"{result.per_second:.1f} img/s",
            f"min({ceil:.0f}, {in_flight}/{latency:g} s) = {bound:.0f} img/s",
            ratio,
            ">= 0.80",
            ratio >= 0.8,
            note=f"image host: {slow.kind}; {loops} worker loop(s) x {CONCURRENCY} in flight",
        )
    )


def _ingest_csv(rows: int, per_row: int = 3) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("S. No.", "Product Name", "Input Image Urls"))
    for r in range(1, rows + 1):
        urls = ",".join(
            f"https://cdn.example.com/catalogue/2024/sku-{r:07d}/photo-{k}.jpg"
            for k in range(1, per_row + 1)
        )
        writer.writerow((r, f"Product {r:07d}", urls))
    return buf.getvalue().encode()


def ingest_baseline(body: bytes, db: Path) -> float:
    """csv.reader + plain sqlite executemany of the same rows and URLs; seconds."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    start = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE rows (request_id TEXT, idx INTEGER, serial TEXT, name TEXT, "
            "urls TEXT, PRIMARY KEY (request_id, idx)) WITHOUT ROWID"
        )
        conn.execute(
            "CREATE TABLE items (id TEXT PRIMARY KEY, request_id TEXT, seq INTEGER, "
            "row INTEGER, position INTEGER, url TEXT, status TEXT)"
        )
        rid = str(uuid.uuid4())
        reader = csv.reader(io.StringIO(body.decode("utf-8")))
        next(reader)
        rows: list[tuple[str, int, str, str, str]] = []
        items: list[tuple[str, str, int, int, int, str, str]] = []
        for idx, (serial, name, cell) in enumerate(reader):
            rows.append((rid, idx, serial, name, cell))
            for pos, url in enumerate(u.strip() for u in cell.split(",")):
                seq = len(items)
                items.append((f"{rid}.{seq}", rid, seq, idx, pos, url, "PENDING"))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", items)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return time.perf_counter() - start


def measure_ingest(ctx: Context) -> None:
    rows = ctx.config.counts.ingest_rows
    body = _ingest_csv(rows)
    baseline = ingest_baseline(body, ctx.work / "ingest-baseline.db")
    with ctx.serve("--workers", "0", name="serve-ingest") as server:
        # One small upload first: imports, thread pool and connections warm.
        server.upload(_ingest_csv(10))
        before = server.api_hwm_mb()
        with profiled(ctx, server.proc.pid, "ingest"):
            request_id, seconds = server.upload(body)
        after = server.api_hwm_mb()
        total = server.status(request_id)["progress"]["total"]
    if total != 3 * rows:
        raise RuntimeError(f"ingest: {total} items stored, expected {3 * rows}")
    ratio = seconds / baseline
    ctx.results.add(
        Row(
            "ingest",
            f"{rows:,} rows / {3 * rows:,} URLs ({len(body) / 1e6:.1f} MB)",
            f"{seconds:.2f} s to request_id",
            f"{baseline:.2f} s csv + sqlite",
            ratio,
            "<= 2.00 x",
            ratio <= 2.0,
        )
    )
    growth = after - before
    ctx.results.add(
        Row(
            "ingest",
            f"server peak RSS growth, {3 * rows:,} URLs",
            f"+{growth:.0f} MB",
            f"{before:.0f} MB before",
            None,
            "<= 100 MB",
            growth <= 100,
        )
    )


def measure_status(ctx: Context) -> None:
    counts = ctx.config.counts
    with ctx.serve(name="serve-status") as server:
        done = server.run_batch(ctx.urls("0.3MP-jpeg", 3))
        status_url = f"{server.url}/api/v1/status/{done.request_id}"
        health_url = f"{server.url}/healthz"
        healthz: list[float] = []
        status: list[float] = []
        tool = ""
        for round_ in range(counts.status_rounds):
            rps, tool = run_load(
                health_url, duration=counts.status_seconds, tool=ctx.config.loadgen
            )
            healthz.append(rps)
            with profiled(ctx, server.proc.pid, f"status-{round_}"):
                rps, tool = run_load(
                    status_url, duration=counts.status_seconds, tool=ctx.config.loadgen
                )
            status.append(rps)
    h = sum(healthz) / len(healthz)
    s = sum(status) / len(status)
    ratio = s / h
    ctx.results.add(
        Row(
            "status API",
            "GET /api/v1/status/{id}, 16 connections",
            f"{s:.0f} req/s",
            f"{h:.0f} req/s GET /healthz",
            ratio,
            ">= 0.50",
            ratio >= 0.5,
            note=f"load generator: {tool}, {counts.status_rounds} x {counts.status_seconds:g} s "
            "per endpoint, alternating",
        )
    )


def _redis_cleanup(url: str, prefix: str) -> None:
    try:
        redis: Any = importlib.import_module("redis")
    except ImportError:
        return
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start : start + 500])
    finally:
        client.close()


def _redis_cpu(url: str) -> float:
    """CPU seconds (user + system) the Redis server has used so far."""
    redis: Any = importlib.import_module("redis")
    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _redis_problem(url: str) -> str | None:
    try:
        redis: Any = importlib.import_module("redis")
    except ImportError:
        return "redis-py not installed (pip install csvimg[redis])"
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        return f"Redis at {url} not reachable: {exc}"
    return None


def measure_scaleout(ctx: Context) -> None:
    counts = ctx.config.counts
    base_url = ctx.config.redis_url
    problem = _redis_problem(base_url)
    if problem:
        ctx.results.add(
            Row("scale-out", "1, 2, 4 workers on Redis", "-", note=f"skipped: {problem}")
        )
        return
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    storage = f"{base_url}?prefix={prefix}"
    blobs = ctx.work / "scaleout-blobs"
    backend = ["--storage", storage, "--queue", storage, "--blobs", f"file://{blobs}"]
    set_name = "2MP-jpeg"
    throughput: dict[int, float] = {}
    details: dict[int, str] = {}
    try:
        with ctx.serve("--workers", "0", *backend, name="serve-scaleout") as server:
            for n in (1, 2, 4):
                workers: list[Worker] = []
                try:
                    for k in range(n):
                        workers.append(
                            Worker(
                                ctx.work,
                                allow=ctx.allow,
                                name=f"worker{n}-{k}",
                                args=[
                                    *backend,
                                    "--data-dir",
                                    str(server.data_dir),
                                    "--concurrency",
                                    str(CONCURRENCY),
                                ],
                                env=ctx.config.env,
                            )
                        )
                    warm = max(1, ctx.config.counts.warmup // 2) * n
                    server.run_batch(ctx.urls("0.3MP-jpeg", warm), timeout=120)
                    cpu_before = sum(w.cpu_seconds() for w in workers)
                    redis_before = _redis_cpu(base_url)
                    result = server.run_batch(ctx.urls(set_name, counts.scaleout_images))
                    cpu = sum(w.cpu_seconds() for w in workers) - cpu_before
                    redis_cpu = _redis_cpu(base_url) - redis_before
                    items = server.items(result.request_id)
                    retried = sum(1 for i in items if i["attempts"] > 1)
                    throughput[n] = result.per_second
                    details[n] = (
                        f"workers: {1000 * cpu / result.images:.1f} ms CPU/image, "
                        f"{cpu / result.seconds:.2f} cores busy; Redis: "
                        f"{1000 * redis_cpu / result.images:.2f} ms CPU/image; "
                        f"{retried} items tried more than once"
                    )
                finally:
                    for worker in workers:
                        worker.close()
    finally:
        _redis_cleanup(base_url, prefix)
        shutil.rmtree(blobs, ignore_errors=True)
    one = throughput[1]
    ceil = ctx.ceilings.get(set_name) or ctx.ceiling_of(set_name)
    ctx.results.point("scaleout-ceiling", "ceiling", ceil)
    for n, value in throughput.items():
        ctx.results.point("scaleout", str(n), value)
        ctx.results.add(
            Row(
                "scale-out",
                f"{n} worker process(es), 2 MP JPEG, {counts.scaleout_images} images",
                f"{value:.1f} img/s",
                f"{one:.1f} img/s with 1 worker",
                value / one,
                "",
                None,
                note=f"{value / ceil:.2f} of the codec ceiling ({ceil:.0f} img/s); {details[n]}",
            )
        )


MEASUREMENTS: dict[str, Callable[[Context], None]] = {
    "codec": measure_codec,
    "latency": measure_latency,
    "ingest": measure_ingest,
    "status": measure_status,
    "memory": measure_memory,
    "scaleout": measure_scaleout,
}


def run(config: Config, only: Sequence[str] = ()) -> Results:
    """Run the measurements named in *only* (all when empty); return the results."""
    from bench._report import load_average

    names = list(only) or list(MEASUREMENTS)
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurement(s) {unknown}; known: {', '.join(MEASUREMENTS)}")
    results = Results(load_before=load_average())
    started = time.perf_counter()
    config.work.mkdir(parents=True, exist_ok=True)
    images_root = config.work / "images"
    sizes = sorted({s.split("-")[0] for s in config.sizes} | {"0.3MP"})
    if "scaleout" in names:
        sizes = sorted(set(sizes) | {"2MP"})
    if "memory" in names:
        sizes = sorted(set(sizes) | {"12MP"})
    print(f"bench: images into {images_root} ...", flush=True)
    sets = make_images(images_root, per_size=config.per_size, sizes=sizes)
    run_dir = config.work / "last-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with StaticServer(images_root, run_dir, kind=config.static) as static:
        print(f"bench: image host {static.kind} at {static.url}", flush=True)
        ctx = Context(
            config=config,
            run_dir=run_dir,
            results=results,
            images_root=images_root,
            sets=sets,
            static=static,
        )
        results.notes.append(f"image host: {static.kind} (keep-alive, another process)")
        for name in names:
            print(f"bench: {name} ...", flush=True)
            t0 = time.perf_counter()
            MEASUREMENTS[name](ctx)
            print(f"bench: {name} took {time.perf_counter() - t0:.1f} s", flush=True)
    results.seconds = time.perf_counter() - started
    results.load_after = load_average()
    return results
