"""Results: the printed table, ``docs/performance.md`` and its plot.

A `Row` is one measurement next to its baseline from the same run: the
ratio is what is judged against the target (the absolute numbers depend on
how busy the machine was; the ratio much less).
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs

__all__ = ["Results", "Row", "machine_info", "plot", "render_markdown", "render_text"]


@attrs.define
class Row:
    """One line of the table."""

    measure: str
    case: str
    value: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "info" if not self.note.startswith("skipped") else "skipped"
        return "PASS" if self.passed else "FAIL"


@attrs.define
class Results:
    """Everything one run measured; ``series`` feeds the plot."""

    rows: list[Row] = attrs.field(factory=list)
    series: dict[str, dict[str, float]] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)
    load_before: str = ""
    load_after: str = ""
    seconds: float = 0.0
    options: str = ""
    quick: bool = False

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(render_text([row], header=False), flush=True)
        return row

    def point(self, series: str, key: str, value: float) -> None:
        self.series.setdefault(series, {})[key] = value


def _fmt_ratio(row: Row) -> str:
    return "" if row.ratio is None else f"{row.ratio:.2f}"


def render_text(rows: Sequence[Row], *, header: bool = True) -> str:
    cols = [
        ("measure", 14),
        ("case", 30),
        ("result", 26),
        ("baseline", 30),
        ("ratio", 6),
        ("target", 14),
        ("", 7),
    ]
    lines = []
    if header:
        lines.append("  ".join(name.ljust(width) for name, width in cols))
        lines.append("  ".join("-" * width for _, width in cols))
    for r in rows:
        cells = [r.measure, r.case, r.value, r.baseline, _fmt_ratio(r), r.target, r.verdict]
        lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells, cols, strict=True)))
        if r.note:
            lines.append(" " * 16 + "note: " + r.note)
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table_md(rows: Sequence[Row]) -> str:
    out = [
        "| measure | case | result | baseline (same run) | ratio | target | verdict |",
        "| --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for r in rows:
        verdict = {"PASS": "✅ pass", "FAIL": "❌ **fail**"}.get(r.verdict, r.verdict)
        out.append(
            "| "
            + " | ".join(
                _md_cell(c)
                for c in (r.measure, r.case, r.value, r.baseline, _fmt_ratio(r), r.target, verdict)
            )
            + " |"
        )
    notes = [(r.measure, r.case, r.note) for r in rows if r.note]
    if notes:
        out.append("")
        out.extend(f"- *{m} / {c}*: {n}" for m, c, n in notes)
    return "\n".join(out)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _mem_total() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "unknown"
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return f"{int(match.group(1)) / 1024 / 1024:.1f} GiB" if match else "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_info() -> list[tuple[str, str]]:
    """(name, value) pairs describing the machine and the software versions."""
    pil_features: Any = importlib.import_module("PIL.features")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 0
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cores (nproc)", str(cores)),
        ("CPU", _cpu_model()),
        ("memory", _mem_total()),
        ("kernel", platform.release()),
        ("Python", sys.version.split()[0]),
        ("Pillow", _version("pillow")),
        ("libjpeg-turbo", str(pil_features.version("libjpeg_turbo"))),
        ("zlib", str(pil_features.version("zlib"))),
        ("httpx", _version("httpx")),
        ("httpcore", _version("httpcore")),
        ("uvicorn", _version("uvicorn")),
        ("starlette", _version("starlette")),
        ("csvimg", _version("csvimg")),
        ("nginx", _tool_version(["nginx", "-v"])),
        ("wrk", _tool_version(["wrk", "-v"])),
        ("redis-server", _tool_version(["redis-server", "--version"])),
    ]


def plot(results: Results, path: Path) -> bool:
    """Draw images/s by size and by worker count next to the ceiling; False if nothing to plot."""
    sizes = results.series.get("e2e", {})
    scale = results.series.get("scaleout", {})
    if not sizes and not scale:
        return False
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    if sizes:
        ceil = results.series.get("ceiling", {})
        labels = list(sizes)
        xs = range(len(labels))
        ax.bar(
            [x - 0.2 for x in xs],
            [ceil.get(k, 0) for k in labels],
            0.4,
            label="codec ceiling (plain Pillow, 1 process/core)",
            color="#bbbbbb",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [sizes[k] for k in labels],
            0.4,
            label="csvimg serve, end to end",
            color="#3b7dd8",
        )
        for x, k in zip(xs, labels, strict=True):
            if ceil.get(k):
                ax.annotate(
                    f"{sizes[k] / ceil[k]:.2f}",
                    (x + 0.2, sizes[k]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(list(xs), labels)
        ax.set_yscale("log")
        ax.set_ylabel("images / s (log)")
        ax.set_title("by image size")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    ax = axes[1]
    if scale:
        labels = list(scale)
        ax.bar(
            labels,
            [scale[k] for k in labels],
            color="#3b7dd8",
            label="csvimg worker processes (Redis)",
        )
        ceiling = results.series.get("scaleout-ceiling", {}).get("ceiling")
        if ceiling:
            ax.axhline(ceiling, color="#888888", linestyle="--", label="codec ceiling")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("images / s")
        ax.set_title("by worker count (2 MP JPEG)")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.suptitle(f"csvimg throughput, {os.cpu_count()} cores", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render_markdown(results: Results, *, image: str | None, findings: str, rerun: str) -> str:
    info = machine_info()
    failed = [r for r in results.rows if r.passed is False]
    parts = [
        "# Performance",
        "",
        "<!-- Written by `python -m bench` (bench/_report.py): edit bench/findings.md, "
        "not this file. -->",
        "",
        "Every measurement is a ratio to a baseline measured **in the same run on the same "
        "machine**, so a busy or slow machine moves both sides; the absolute numbers are "
        "only a guide. Targets come from issue 6.",
        "",
        *(
            [
                '!!! warning "Quick run"',
                "    Made with `--quick`: reduced sizes, to check that everything works. "
                "The numbers are rough; the targets are judged on a full run "
                "(`python -m bench`).",
                "",
            ]
            if results.quick
            else []
        ),
        f"Run: `{results.options}`, {results.seconds:.0f} s; load average "
        f"{results.load_before} before, {results.load_after} after"
        + (f" ({len(failed)} target(s) missed)." if failed else "."),
        "",
        render_table_md(results.rows),
        "",
    ]
    if image:
        parts += [f"![images/s by size and by worker count]({image})", ""]
    if results.notes:
        parts += ["## Notes from this run", ""] + [f"- {n}" for n in results.notes] + [""]
    parts += [
        "## Machine and versions",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {_md_cell(v)} |" for k, v in info],
        "",
        "## How to rerun",
        "",
        rerun.strip(),
        "",
    ]
    if findings.strip():
        parts += [findings.strip(), ""]
    return "\n".join(parts)
