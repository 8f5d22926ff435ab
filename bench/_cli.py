"""The command line of the bench: ``python -m bench [--quick] [--only NAME] [--out FILE]``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench._report import plot, render_markdown, render_text
from bench._suite import FULL, MEASUREMENTS, QUICK, Config, run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

RERUN = """\
```sh
nox -s bench                                  # full run; rewrites this page and its plot
.venv/bin/python -m bench                     # the same, in a venv with '.[dev,bench]'
.venv/bin/python -m bench --quick --out /tmp/perf.md     # small sizes, about a minute
.venv/bin/python -m bench --only codec --profile         # py-spy profiles in bench/_work/profiles/
```

Optional system packages (Debian) that make the numbers better, used when
present: `nginx-light libnginx-mod-http-echo` (image host: sendfile, almost no
CPU; else uvicorn) and `wrk` (load generator; else an asyncio one). The
scale-out measurement needs a Redis server on 127.0.0.1:6379 (it uses db 14
and deletes its keys afterwards). Run it on a quiet machine: every number
is measured next to its baseline, but two cores shared with other work
still make single runs noisy."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure csvimg against baselines taken in the same run; print a table "
        "and write docs/performance.md with a plot.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: checks that everything works (numbers are rough)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        default=[],
        help=f"run only these measurements (repeatable or comma-separated): "
        f"{', '.join(MEASUREMENTS)}",
    )
    parser.add_argument(
        "--out",
        default=str(REPO / "docs" / "performance.md"),
        metavar="FILE",
        help="report to write ('-' for none; the plot goes to img/ beside it)",
    )
    parser.add_argument(
        "--work",
        default=str(HERE / "_work"),
        metavar="DIR",
        help="scratch folder: images, databases, logs (default bench/_work)",
    )
    parser.add_argument(
        "--sizes",
        metavar="LIST",
        help="image sets of the codec measurement (default 0.3MP-jpeg,2MP-jpeg,12MP-jpeg,2MP-png)",
    )
    parser.add_argument(
        "--static",
        choices=("auto", "nginx", "uvicorn"),
        default="auto",
        help="image host (auto: nginx if installed)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="status API load generator (auto: wrk if installed)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="all",
        choices=("all", "gil", "wall"),
        help="record py-spy profiles of the server during the measurements "
        "(gil: only samples holding the GIL; wall: waiting threads too)",
    )
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/14",
        metavar="URL",
        help="Redis for the scale-out measurement (127.0.0.1 only)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the product processes, for experiments "
        "(e.g. PILLOW_BLOCKS_MAX=16, MALLOC_ARENA_MAX=2); noted in the report",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in only if n not in MEASUREMENTS]
    if unknown:
        print(
            f"unknown measurement(s): {', '.join(unknown)}; known: {', '.join(MEASUREMENTS)}",
            file=sys.stderr,
        )
        return 2
    if not args.redis.startswith("redis://127.0.0.1:"):
        print("--redis must be a redis://127.0.0.1:PORT/DB URL", file=sys.stderr)
        return 2
    config = Config(
        work=Path(args.work).absolute(),
        counts=QUICK if args.quick else FULL,
        static=args.static,
        loadgen=args.loadgen,
        profile=args.profile,
        redis_url=args.redis,
    )
    if args.sizes:
        config.sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"--env wants KEY=VALUE, not {item!r}", file=sys.stderr)
            return 2
        config.env[key] = value
    started = time.time()
    results = run(config, only)
    results.options = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    results.quick = args.quick
    if config.env:
        results.notes.append(f"product environment: {config.env}")
    print()
    print(render_text(results.rows))
    failed = [r for r in results.rows if r.passed is False]
    print(
        f"\n{len(results.rows)} rows, {len(failed)} target(s) missed, {time.time() - started:.0f} s"
    )
    if args.out != "-":
        out = Path(args.out)
        image = out.parent / "img" / "performance.png"
        drawn = plot(results, image)
        findings_path = HERE / "findings.md"
        findings = findings_path.read_text() if findings_path.exists() else ""
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            render_markdown(
                results,
                image="img/performance.png" if drawn else None,
                findings=findings,
                rerun=RERUN,
            )
        )
        print(f"wrote {out}" + (f" and {image}" if drawn else ""))
    return 0
