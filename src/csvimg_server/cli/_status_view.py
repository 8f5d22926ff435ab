"""How ``csvimg status`` shows a request: a small table, plain lines or a progress bar.

Everything here reads the JSON body of ``GET /api/v1/status/{id}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

from csvimg_server.cli._output import isatty

__all__ = ["print_status", "watch"]

_STATUS_STYLE: Final = {"COMPLETED": "bold green", "FAILED": "bold red",
                        "PROCESSING": "bold yellow", "PENDING": "bold"}


def _status_counts(body: Mapping[str, Any]) -> tuple[int, int, int]:
    progress = body.get("progress") or {}
    return (int(progress.get("done", 0)), int(progress.get("failed", 0)),
            int(progress.get("total", 0)))


def _progress_text(body: Mapping[str, Any]) -> str:
    done, failed, total = _status_counts(body)
    pct = 100 * (done + failed) // total if total else 100
    return (f"{done + failed}/{total} images ({pct}%): "
            f"{done} done, {failed} failed, {total} total")


def _duration(body: Mapping[str, Any]) -> str | None:
    from datetime import UTC, datetime

    try:
        created = datetime.fromisoformat(str(body["created_at"]))
        updated = datetime.fromisoformat(str(body["updated_at"]))
    except (KeyError, ValueError):
        return None
    if body.get("status") in ("COMPLETED", "FAILED"):
        return f"took {(updated - created).total_seconds():.1f} s"
    return f"running for {(datetime.now(UTC) - created).total_seconds():.0f} s"


def print_status(body: Mapping[str, Any], stream: TextIO) -> None:
    """Print a status body as aligned ``name value`` lines, the status in colour."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(file=stream, highlight=False, soft_wrap=True)
    status = str(body.get("status"))
    style = _STATUS_STYLE.get(status, "bold")
    rows = [
        ("request", escape(str(body.get("request_id")))),
        ("status", f"[{style}]{escape(status)}[/]"),
        ("progress", escape(_progress_text(body))),
        ("created", escape(str(body.get("created_at")))),
        ("updated", escape(str(body.get("updated_at")))),
    ]
    if (duration := _duration(body)) is not None:
        rows.append(("time", duration))
    if body.get("output_csv_url"):
        rows.append(("output", escape(str(body["output_csv_url"]))))
    for name, value in rows:
        console.print(f"{name:<9} {value}")


def watch(body: dict[str, Any], fetch: Callable[[], dict[str, Any]], *,
          interval: float, stream: TextIO) -> dict[str, Any]:
    """Call *fetch* every *interval* s until the request finished; return the last body.

    On a terminal the progress is a bar; otherwise a line each time it changes.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    def finished(b: Mapping[str, Any]) -> bool:
        return b.get("status") in ("COMPLETED", "FAILED")

    def poll() -> dict[str, Any]:
        time.sleep(interval)
        return fetch()

    if isatty(stream):
        progress = Progress(
            TextColumn("{task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            console=Console(file=stream), transient=True,
        )
        with progress:
            done, failed, total = _status_counts(body)
            task = progress.add_task("images", total=total, completed=done + failed,
                                     failed=failed, status=body.get("status"))
            while not finished(body):
                body = poll()
                done, failed, total = _status_counts(body)
                progress.update(task, total=total, completed=done + failed, failed=failed,
                                status=body.get("status"))
        return body
    last = ""
    while True:
        line = f"{body.get('status')}: {_progress_text(body)}"
        if line != last:
            print(line, file=stream, flush=True)
            last = line
        if finished(body):
            return body
        body = poll()
