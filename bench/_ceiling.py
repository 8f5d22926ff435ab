"""The codec ceiling: plain Pillow, one process per core, no I/O.

Each process holds the encoded test images in memory, decodes each one
(``Image.open`` + ``load``), converts to RGB when needed and re-encodes
it as JPEG quality 50 into `io.BytesIO` (baseline JPEG, no Huffman
optimisation: the same encoder settings as csvimg). All processes start
together at a barrier; images/s is the total count over the wall time from
the first start to the last finish. Processes are spawned (fresh
interpreters, like the server) and are always joined or killed.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from PIL import Image

__all__ = ["Ceiling", "ceiling", "cores", "transcode"]


def cores() -> int:
    """Cores this process may run on (what ``nproc`` says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def transcode(data: bytes, quality: int = 50) -> int:
    """Decode *data* and re-encode it as JPEG; return the output size."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        out_im = im if im.mode in ("RGB", "L") else im.convert("RGB")
        out = io.BytesIO()
        out_im.save(out, "JPEG", quality=quality, optimize=False, progressive=False)
    return out.tell()


def _child(paths: Sequence[str], count: int, barrier: Any, results: Any, index: int) -> None:
    try:
        blobs = [Path(p).read_bytes() for p in paths]
        for data in blobs[:2]:  # warm the decoder, allocator and caches
            transcode(data)
        barrier.wait(60)
        start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        cpu = time.process_time()
        for n in range(count):
            transcode(blobs[(n + index) % len(blobs)])
        results.put((index, start, time.monotonic(), time.process_time() - cpu, None))
    except BaseException as exc:  # report, never hang the parent
        results.put((index, 0.0, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


@attrs.frozen
class Ceiling:
    """What the plain-Pillow processes achieved."""

    per_second: float
    """Images per second, all processes together (wall clock)."""
    cpu_ms_per_image: float
    """CPU time one transcode took (user + system), whatever the machine's load."""


def ceiling(paths: Sequence[Path], total: int, processes: int | None = None) -> Ceiling:
    """*total* plain-Pillow transcodes of *paths* over *processes* (default: cores)."""
    n = processes or cores()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    shares = [total // n + (1 if i < total % n else 0) for i in range(n)]
    procs = [
        ctx.Process(
            target=_child,
            args=([str(p) for p in paths], shares[i], barrier, results, i),
            daemon=True,
        )
        for i in range(n)
    ]
    try:
        for proc in procs:
            proc.start()
        got = [results.get(timeout=600) for _ in procs]
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    errors = [e for *_, e in got if e]
    if errors:
        raise RuntimeError(f"codec ceiling worker failed: {errors[0]}")
    start: float = min(g[1] for g in got)
    end: float = max(g[2] for g in got)
    cpu: float = sum(g[3] for g in got)
    return Ceiling(per_second=total / (end - start), cpu_ms_per_image=1000 * cpu / total)
