"""``csvimg process``: a one-shot local run with a progress display.

Memory storage and queue, images written to ``DIR/images/``, one
in-process worker; the output CSV goes to ``DIR/<stem>-output.csv`` with
image URLs relative to DIR (or absolute under ``--base-url``).
"""

from __future__ import annotations

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
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from csvimg._errors import ManifestError
from csvimg.engine import Engine
from csvimg.jobs import Item, ItemResult, ItemStatus, ProcessOptions
from csvimg.settings import Settings

__all__ = ["Tally", "print_problems", "run_process"]

_PLAIN_EVERY = 2.0
"""Seconds between progress lines when stdout is not a terminal."""

_MAX_LISTED = 100
"""Failed images listed one by one in the summary."""


@attrs.define
class Tally:
    """What the worker reported so far, updated from `Engine.on_item`."""

    done: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def record(self, item: Item, result: ItemResult) -> None:
        """Count one finished item."""
        if result.ok:
            self.done += 1
            self.bytes_in += result.bytes_in or 0
            self.bytes_out += result.bytes_out or 0
        else:
            self.failed += 1

    @property
    def saved(self) -> str:
        """Bytes saved on the successful images, as a percentage."""
        if not self.bytes_in:
            return "0%"
        return f"{100 * (1 - self.bytes_out / self.bytes_in):.1f}%"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def print_problems(exc: ManifestError, stream: TextIO) -> None:
    """Print a rejected CSV's problems as a table (row, column, code, message)."""
    console = Console(file=stream, highlight=False, soft_wrap=False)
    console.print(f"invalid CSV: {exc}", markup=False)
    table = Table("row", "column", "code", "message", show_lines=False)
    for p in exc.errors:
        table.add_row(
            "" if p.row is None else str(p.row), p.column or "", p.code, p.message
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


async def _rich_progress(
    engine: Engine, request_id: str, tally: Tally, total: int, stdout: TextIO
) -> None:
    progress = Progress(
        TextColumn("compressing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed, saved {task.fields[saved]}"),
        TimeElapsedColumn(),
        console=Console(file=stdout),
    )
    with progress:
        task = progress.add_task("images", total=total, failed=0, saved="0%")

        def tick() -> None:
            progress.update(
                task, completed=tally.done + tally.failed, failed=tally.failed, saved=tally.saved
            )

        await _wait_finished(engine, request_id, tick)


async def _plain_progress(
    engine: Engine, request_id: str, tally: Tally, total: int, console: Console
) -> None:
    last = time.monotonic()

    def tick() -> None:
        nonlocal last
        if time.monotonic() - last >= _PLAIN_EVERY:
            last = time.monotonic()
            console.print(
                f"progress: {tally.done + tally.failed}/{total} images "
                f"({tally.failed} failed)",
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
                rows = await engine.storage.list_rows(request_id, offset=item.row, limit=1)
                failed.append((rows[0].line if rows else item.row + 2, item))


def _summary(
    console: Console, tally: Tally, failures: list[tuple[int, Item]], target: Path
) -> None:
    console.print(
        f"done: {tally.done} images compressed, {len(failures)} failed", markup=False
    )
    console.print(
        f"bytes: {_size(tally.bytes_in)} in, {_size(tally.bytes_out)} out, "
        f"saved {tally.saved}",
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

