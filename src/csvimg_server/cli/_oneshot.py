"""``csvimg process``: a one-shot local run of a CSV into a folder.

Memory storage and queue, images written to ``DIR/images/``; the run
itself and its progress display are `csvimg_server._process.run_process`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csvimg._errors import ConfigError
from csvimg.settings import Settings
from csvimg_server.cli._errors import UsageError
from csvimg_server.cli._options import add_logging_options, setup_logging

__all__ = ["add_process_parser", "cmd_process"]

_EXAMPLES = """\
examples:
  csvimg process products.csv --out results/
      writes results/products-output.csv and results/images/...
  csvimg process products.csv --out site/ --base-url https://cdn.example.com/site
      the output CSV then holds https://cdn.example.com/site/images/... URLs
  csvimg process products.csv --out results/ --quality 70 --max-dimension 1600
  csvimg process products.csv --out results/ > run.log
      not a terminal: a plain progress line every few seconds instead of the bar

exit status: 0 when the run finished (even if some images failed; the
summary lists them), 1 when the CSV is invalid, 2 on usage errors.
"""


def add_process_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``process`` subcommand to *sub*."""
    process = sub.add_parser(
        "process", help="compress a CSV's images into a folder, locally",
        description="One-shot local run: download and compress every image of FILE.csv "
                    "into DIR/images/ and write DIR/<name>-output.csv.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    process.add_argument("file", metavar="FILE.csv", help="the CSV to process")
    process.add_argument("--out", required=True, metavar="DIR", help="output folder")
    process.add_argument("--base-url", metavar="URL",
                         help="URL where DIR will be published: makes the output CSV's image "
                              "URLs absolute (default: relative paths images/...)")
    process.add_argument("--quality", type=int, metavar="Q", help="output quality 1-100 "
                                                                   "(default 50)")
    process.add_argument("--format", metavar="FMT", help="output format (default JPEG)")
    process.add_argument("--max-dimension", type=int, metavar="PX",
                         help="cap on the longer side in pixels")
    process.add_argument("--concurrency", type=int, metavar="N",
                         help="images in flight (default 32)")
    add_logging_options(process, "error")
    process.set_defaults(func=cmd_process)


def cmd_process(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg process``: one-shot local run of a CSV into a folder."""
    from csvimg_server._process import run_process

    # Failed images are listed in the summary; their per-item warnings would
    # only repeat them (and cut through the progress bar), hence "error".
    setup_logging(args, env, default="error")
    source = Path(args.file)
    if not source.is_file():
        raise UsageError(f"no such file: {source}")
    out = Path(args.out).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc}") from None
    overrides: dict[str, Any] = {
        "storage_url": "memory://",
        "queue_url": "memory://",
        "blobs_url": f"file://{out / 'images'}",
    }
    if args.concurrency is not None:
        overrides["concurrency"] = max(1, args.concurrency)
    try:
        settings = Settings.from_env(env, **overrides)
        options = settings.options
        changes: dict[str, Any] = {}
        if args.quality is not None:
            changes["quality"] = args.quality
        if args.format is not None:
            changes["format"] = "JPEG" if args.format.upper() == "JPG" else args.format
        if args.max_dimension is not None:
            changes["max_dimension"] = args.max_dimension or None
        if changes:
            import attrs

            options = attrs.evolve(options, **changes)
    except (ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return run_process(
        settings, options, source, out, base_url=args.base_url, stdout=sys.stdout
    )
