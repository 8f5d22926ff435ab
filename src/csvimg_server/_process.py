"""``csvimg process`` and the progress shown by the ``csvimg`` commands.

``process`` is a one-shot local run: memory storage and queue, images
written to ``DIR/images/``, one in-process worker; the output CSV goes to
``DIR/<stem>-output.csv`` with image URLs relative to DIR (or absolute
under ``--base-url``). On a terminal it shows a rich progress bar (images
done and failed, images/s, bytes saved); otherwise a plain line every
`PLAIN_EVERY` seconds.

`Tally` counts finished items from `Engine.on_item`; `ThroughputLog` logs
a line of throughput every few seconds from it (``serve`` and ``worker``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import anyio
import attrs
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from csvimg._errors import ManifestError
from csvimg.engine import Engine
from csvimg.jobs import Item, ItemResult, ItemStatus, ProcessOptions
from csvimg.settings import Settings

__all__ = ["PLAIN_EVERY", "Tally", "ThroughputLog", "format_size", "print_problems",
           "run_process"]

PLAIN_EVERY = 2.0
"""Seconds between progress lines of ``process`` when stdout is not a terminal."""

_MAX_LISTED = 100
"""Failed images listed one by one in the summary."""


@attrs.define
class Tally:
    """What the workers reported so far, updated from `Engine.on_item`.

    Written by the event loop's thread and read by others (`ThroughputLog`):
    plain integer attributes, each update atomic under the GIL.
    """

    done: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = attrs.field(factory=time.monotonic)

    def record(self, item: Item, result: ItemResult) -> None:
        """Count one finished item."""
        if result.ok:
            self.bytes_in += result.bytes_in or 0
            self.bytes_out += result.bytes_out or 0
            self.done += 1
        else:
            self.failed += 1

    @property
    def finished(self) -> int:
        """Items done or failed."""
        return self.done + self.failed

    @property
    def saved_bytes(self) -> int:
        """Bytes saved on the successful images (negative if they grew)."""
        return self.bytes_in - self.bytes_out

    @property
    def saved(self) -> str:
        """Bytes saved on the successful images, as a percentage."""
        return _percent(self.bytes_in, self.bytes_out)

    def rate(self, now: float | None = None) -> float:
        """Finished items per second since `started`."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        return self.finished / elapsed if elapsed > 0 else 0.0


def _percent(bytes_in: int, bytes_out: int) -> str:
    if not bytes_in:
        return "0%"
    return f"{100 * (1 - bytes_out / bytes_in):.1f}%"


def format_size(n: int) -> str:
    """Format a byte count for people: ``512 B``, ``1.5 KiB``, ``-2.0 MiB``."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover



class ThroughputLog:
    """Log one line of throughput every *interval* seconds, from a thread.

    Quiet while nothing finishes, so an idle server writes nothing::

        throughput: 42 images in 10 s (4.2/s), 1 failed; saved 3.1 MiB (61.0%);
        since start 1200 done, 12 failed

    `start` and `stop` (or ``with``) run and end the thread; the thread
    only reads the `Tally`, which the workers keep updating.
    """

    def __init__(self, tally: Tally, interval: float, logger: logging.Logger) -> None:
        self.tally = tally
        self.interval = interval
        self.logger = logger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="csvimg-throughput", daemon=True)
        self._last = (tally.done, tally.failed, tally.bytes_in, tally.bytes_out)
        self._last_at = time.monotonic()

    def line(self, now: float | None = None) -> str | None:
        """The line for the time since the previous one; None when nothing finished."""
        t = self.tally
        now = time.monotonic() if now is None else now
        current = (t.done, t.failed, t.bytes_in, t.bytes_out)
        done, failed, bytes_in, bytes_out = (a - b for a, b in zip(current, self._last,
                                                                    strict=True))
        elapsed = max(now - self._last_at, 1e-9)
        self._last, self._last_at = current, now
        if not done and not failed:
            return None
        return (
            f"throughput: {done + failed} images in {elapsed:.0f} s "
            f"({(done + failed) / elapsed:.1f}/s), {failed} failed; "
            f"saved {format_size(bytes_in - bytes_out)} ({_percent(bytes_in, bytes_out)}); "
            f"since start {t.done} done, {t.failed} failed"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            line = self.line()
            if line is not None:
                self.logger.info("%s", line)

    def start(self) -> ThroughputLog:
        """Start the thread (no-op for an interval of 0 or less)."""
        if self.interval > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> ThroughputLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def print_problems(exc: ManifestError, stream: TextIO) -> None:
    """Print a rejected CSV's problems as a table (row, column, code, message)."""
    console = Console(file=stream, highlight=False, soft_wrap=False)
    count = len(exc.errors)
    console.print(f"invalid CSV: {count} problem{'s' if count != 1 else ''}", markup=False)
    table = Table(show_lines=False, header_style="bold")
    table.add_column("row", justify="right", no_wrap=True)
    table.add_column("column", overflow="fold")
    table.add_column("code", no_wrap=True, style="bold red")
    table.add_column("message", ratio=1, overflow="fold")
    for p in exc.errors:
        # The row is in its own column; the message need not repeat it.
        message = p.message.removeprefix(f"row {p.row}: ") if p.row is not None else p.message
        table.add_row(
            "-" if p.row is None else str(p.row), p.column or "", p.code, message
        )
    console.print(table)


def run_process(
    settings: Settings,
    options: ProcessOptions,
    source: Path,
    out: Path,
    *,
    base_url: str | None,
    stdout: TextIO,
) -> int:
    """Process *source* into *out*; return the exit status (0 done, 1 invalid CSV)."""
    return anyio.run(_run, settings, options, source, out, base_url, stdout)


async def _run(
    settings: Settings,
    options: ProcessOptions,
    source: Path,
    out: Path,
    base_url: str | None,
    stdout: TextIO,
) -> int:
    console = Console(file=stdout, highlight=False)
    tally = Tally()
    engine = Engine(settings)
    engine.on_item(tally.record)
    async with engine:
        try:
            with source.open("rb") as fp:
                manifest = await engine.parse(fp)
        except ManifestError as exc:
            print_problems(exc, stdout)
            return 1
        request = await engine.submit(manifest, options=options, filename=source.name)
        tally.started = time.monotonic()  # images/s counts from here, not from the parse
        total = request.total
        console.print(
            f"{source.name}: {len(manifest.rows)} rows, {total} images -> {out}", markup=False
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: engine.run_worker(deliver=False, sweep=False))
            if console.is_terminal:
                await _rich_progress(engine, request.id, tally, total, stdout)
            else:
                await _plain_progress(engine, request.id, tally, total, console)
            tg.cancel_scope.cancel()
        prefix = "images/" if not base_url else base_url.rstrip("/") + "/images/"

        def url_for(item: Item) -> str | None:
            return None if item.output_key is None else prefix + item.output_key

        target = out / f"{source.stem}-output.csv"
        with target.open("wb") as sink:
            async for chunk in engine.output_csv(request.id, url_for=url_for):
                sink.write(chunk)
        failures = await _failures(engine, request.id)
        _summary(console, tally, failures, target)
    return 0


async def _wait_finished(engine: Engine, request_id: str, on_tick: Callable[[], Any]) -> None:
    while True:
        request = await engine.get_request(request_id)
        on_tick()
        if request.status.finished:
            return
        await anyio.sleep(0.1)


def _rate(tally: Tally) -> str:
    return f"{tally.rate():.1f} img/s"


def _saved_text(tally: Tally) -> str:
    return f"saved {format_size(tally.saved_bytes)} ({tally.saved})"


async def _rich_progress(
    engine: Engine, request_id: str, tally: Tally, total: int, stdout: TextIO
) -> None:
    progress = Progress(
        TextColumn("compressing"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[failed]} failed · {task.fields[rate]} · {task.fields[saved]}"),
        TimeElapsedColumn(),
        console=Console(file=stdout),
    )
    with progress:
        task = progress.add_task(
            "images", total=total, failed=0, rate=_rate(tally), saved=_saved_text(tally)
        )

        def tick() -> None:
            progress.update(
                task,
                completed=tally.finished,
                failed=tally.failed,
                rate=_rate(tally),
                saved=_saved_text(tally),
            )

        await _wait_finished(engine, request_id, tick)


async def _plain_progress(
    engine: Engine, request_id: str, tally: Tally, total: int, console: Console
) -> None:
    last = time.monotonic()

    def tick() -> None:
        nonlocal last
        if time.monotonic() - last >= PLAIN_EVERY:
            last = time.monotonic()
            console.print(
                f"progress: {tally.finished}/{total} images, {tally.failed} failed, "
                f"{_rate(tally)}, {_saved_text(tally)}",
                markup=False,
            )

    await _wait_finished(engine, request_id, tick)


async def _failures(engine: Engine, request_id: str) -> list[tuple[int, Item]]:
    """Failed items with the spreadsheet row number of their product."""
    failed: list[tuple[int, Item]] = []
    offset = 0
    while True:
        page = await engine.items(request_id, offset=offset, limit=1000)
        if not page:
            return failed
        offset += len(page)
        for item in page:
            if item.status is ItemStatus.FAILED:
                rows = await engine.rows(request_id, offset=item.row, limit=1)
                failed.append((rows[0].line if rows else item.row + 2, item))


def _summary(
    console: Console, tally: Tally, failures: list[tuple[int, Item]], target: Path
) -> None:
    console.print(
        f"done: {tally.done} images compressed, {len(failures)} failed", markup=False
    )
    console.print(
        f"bytes: {format_size(tally.bytes_in)} in, {format_size(tally.bytes_out)} out, "
        f"saved {format_size(tally.saved_bytes)} ({tally.saved}) in "
        f"{time.monotonic() - tally.started:.1f} s ({_rate(tally)})",
        markup=False,
    )
    for line, item in failures[:_MAX_LISTED]:
        console.print(
            f"  failed: row {line}: {item.url}: {item.error_code}: {item.error_message}",
            markup=False,
            soft_wrap=True,
        )
    if len(failures) > _MAX_LISTED:
        console.print(f"  ... and {len(failures) - _MAX_LISTED} more (see the items)",
                      markup=False)
    console.print(f"output CSV: {target}", markup=False)

