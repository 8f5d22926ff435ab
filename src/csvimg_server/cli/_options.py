"""Options several commands share: backends, shutdown, logging and throughput lines.

Each group is added to a command's parser here and read back here, so
its help text and its parsing stay side by side.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Final, TextIO

from csvimg_server.cli._env import choice_option, seconds_option
from csvimg_server.cli._errors import UsageError
from csvimg_server.cli._output import isatty

__all__ = [
    "DEFAULT_STATS_INTERVAL",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SHUTDOWN_TIMEOUT",
    "add_backend_options",
    "add_logging_options",
    "setup_logging",
    "stats_interval",
]

SHUTDOWN_TIMEOUT: Final = 30.0
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: Final = ("text", "json")
DEFAULT_STATS_INTERVAL: Final = 10.0
"""Seconds between throughput lines of ``serve``/``worker`` when stderr is a terminal."""


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``serve`` and ``worker``: backends, concurrency, stop, logs."""
    group = parser.add_argument_group("backends")
    group.add_argument("--data-dir", metavar="DIR",
                       help="folder of the default SQLite database and images "
                            "(env CSVIMG_DATA_DIR; default ./csvimg-data)")
    group.add_argument("--storage", metavar="URL",
                       help="storage URL: sqlite:///path.db, redis://host:6379/0, memory:// "
                            "(env CSVIMG_STORAGE; default sqlite in the data folder)")
    group.add_argument("--queue", metavar="URL",
                       help="queue URL (env CSVIMG_QUEUE; default: the storage URL)")
    group.add_argument("--blobs", metavar="URL",
                       help="image store URL: file:///dir (env CSVIMG_BLOBS; "
                            "default DATA_DIR/images)")
    parser.add_argument("--concurrency", type=int, metavar="N",
                        help="images each worker loop keeps in flight (env CSVIMG_CONCURRENCY; "
                             "default 32); compression uses every core")
    parser.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT,
                        metavar="SECONDS",
                        help="on stop, how long in-flight images may take to finish "
                             f"(default {SHUTDOWN_TIMEOUT:g})")
    add_logging_options(parser, "info")
    parser.add_argument("--stats-interval", type=float, metavar="SECONDS",
                        help="log a throughput line (images/s, failed, bytes saved) every "
                             "SECONDS while images finish; 0 = never (env "
                             f"CSVIMG_STATS_INTERVAL; default {DEFAULT_STATS_INTERVAL:g} when "
                             "stderr is a terminal, else 0)")


def add_logging_options(parser: argparse.ArgumentParser, default: str) -> None:
    """Add ``--log-level`` (help naming *default*) and ``--log-format``."""
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower,
                       help=f"log level (env CSVIMG_LOG_LEVEL; default {default})")
    group.add_argument("--log-format", choices=LOG_FORMATS, type=str.lower,
                       help="log lines as text or one JSON object per line "
                            "(env CSVIMG_LOG_FORMAT; default text)")


def setup_logging(args: argparse.Namespace, env: Mapping[str, str], default: str = "info") -> str:
    """Apply ``--log-level``/``--log-format`` (or their variables); return the level."""
    level = choice_option(args.log_level, env, "CSVIMG_LOG_LEVEL", default, LOG_LEVELS)
    fmt = choice_option(args.log_format, env, "CSVIMG_LOG_FORMAT", "text", LOG_FORMATS)
    from csvimg_server.logs import configure_logging

    try:
        configure_logging(level, fmt)
    except ValueError as exc:  # pragma: no cover - both were checked above
        raise UsageError(str(exc)) from None
    return level


def stats_interval(args: argparse.Namespace, env: Mapping[str, str], stream: TextIO) -> float:
    """Seconds between throughput lines: option, variable, else 10 on a terminal, 0 (off)."""
    return seconds_option(
        args.stats_interval, env, "CSVIMG_STATS_INTERVAL",
        DEFAULT_STATS_INTERVAL if isatty(stream) else 0.0,
        option="--stats-interval",
    )
