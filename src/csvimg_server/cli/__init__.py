"""The ``csvimg`` command: serve, worker, process, validate, status.

Every backend option has an environment variable (``--storage`` and
``CSVIMG_STORAGE`` ...); an option on the command line wins over the
variable, which wins over the default. With no configuration at all,
``serve`` and ``worker`` share ``./csvimg-data/``: the SQLite database
``csvimg.db`` (storage and queue) and the image folder ``images/``.

Logging (``serve``, ``worker``, ``process``): ``--log-level`` /
``CSVIMG_LOG_LEVEL`` and ``--log-format text|json`` / ``CSVIMG_LOG_FORMAT``,
applied by `csvimg_server.logs.configure_logging` (uvicorn's own lines
included). Progress: ``process`` shows a progress bar on a terminal and a
plain line every few seconds otherwise; ``serve`` and ``worker`` log a line
of throughput every ``--stats-interval`` seconds while images finish (by
default every 10 s when stderr is a terminal, never otherwise).

Exit codes: 0 success, 1 failure (invalid CSV, server unreachable...),
2 usage or configuration errors.

Each command lives in its own private module with its options, help
examples and code (``_serve``, ``_worker``, ``_oneshot`` for ``process``,
``_validate``, ``_status``); this module assembles the parser and runs
the chosen command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from csvimg_server.cli._backends import DEFAULT_DATA_DIR
from csvimg_server.cli._errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, print_error
from csvimg_server.cli._oneshot import add_process_parser, cmd_process
from csvimg_server.cli._options import (
    DEFAULT_STATS_INTERVAL,
    LOG_FORMATS,
    LOG_LEVELS,
    SHUTDOWN_TIMEOUT,
)
from csvimg_server.cli._serve import DEFAULT_HOST, DEFAULT_PORT, add_serve_parser, cmd_serve
from csvimg_server.cli._status import (
    DEFAULT_SERVER,
    STATUS_INTERVAL,
    add_status_parser,
    cmd_status,
)
from csvimg_server.cli._validate import add_validate_parser, cmd_validate
from csvimg_server.cli._worker import add_worker_parser, cmd_worker

# The commands, defaults and exit codes were importable from here when the
# CLI was one module; they stay so.
__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_SERVER",
    "DEFAULT_STATS_INTERVAL",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SHUTDOWN_TIMEOUT",
    "STATUS_INTERVAL",
    "UsageError",
    "build_parser",
    "cmd_process",
    "cmd_serve",
    "cmd_status",
    "cmd_validate",
    "cmd_worker",
    "main",
]

log = logging.getLogger("csvimg.server")

_MAIN_EXAMPLES = """\
examples:
  csvimg serve                             start the server (SQLite + local files)
  csvimg process products.csv --out out/   compress a CSV's images locally
  csvimg validate products.csv             check a CSV
  csvimg status <request_id> --watch       follow a request on a server
  csvimg <command> --help                  options and examples of a command
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the ``csvimg`` argument parser (one subcommand per command)."""
    parser = argparse.ArgumentParser(
        prog="csvimg",
        description="Compress the images listed in a CSV: as an HTTP service "
                    "(serve, worker) or locally (process).",
        epilog=_MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The order here is the order of `csvimg --help`.
    for add in (add_serve_parser, add_worker_parser, add_process_parser,
                add_validate_parser, add_status_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the ``csvimg`` command; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    env = os.environ if environ is None else environ
    func: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.func
    try:
        return func(args, env)
    except UsageError as exc:
        print_error(parser.prog, args.command, str(exc), sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
