"""``csvimg validate``: check a CSV with the limits a server would apply."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from csvimg._errors import ConfigError, ManifestError
from csvimg_server.cli._errors import EXIT_FAILED, EXIT_OK, UsageError

__all__ = ["add_validate_parser", "cmd_validate"]

_EXAMPLES = """\
examples:
  csvimg validate products.csv
      prints 'OK: N rows, M images' (exit 0) or a table of every problem
      (row, column, code, message; exit 1)
  CSVIMG_MAX_ROWS=500 csvimg validate products.csv
      with the limits the server will apply (CSVIMG_MAX_* variables)
"""


def add_validate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``validate`` subcommand to *sub*."""
    validate = sub.add_parser(
        "validate", help="check a CSV without processing it",
        description="Validate FILE.csv: list every problem (row, column, code, message).",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("file", metavar="FILE.csv", help="the CSV to check")
    validate.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg validate``: check a CSV without processing it."""
    from csvimg.manifest import ManifestLimits, parse_manifest
    from csvimg_server._process import print_problems

    source = Path(args.file)
    if not source.is_file():
        raise UsageError(f"no such file: {source}")
    try:
        limits = ManifestLimits.from_env(env)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        with source.open("rb") as fp:
            manifest = parse_manifest(fp, limits)
    except ManifestError as exc:
        print_problems(exc, sys.stdout)
        return EXIT_FAILED
    print(f"OK: {len(manifest.rows)} rows, {manifest.total_urls} images")
    return EXIT_OK
