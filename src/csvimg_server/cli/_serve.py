"""``csvimg serve``: the HTTP API (uvicorn) with worker loops in and beside it.

The first worker runs in the server process; ``--workers N`` runs the
other N-1 as ``csvimg worker`` children on the same backends (see
`csvimg_server.cli._children`), except on ``memory://``, which cannot be
shared between processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Final

from csvimg._errors import ConfigError
from csvimg._util import mask_password
from csvimg.hooks import scheme_of
from csvimg_server.cli._backends import backend_settings, resolve_queue
from csvimg_server.cli._children import start_worker_children, stop_worker_children
from csvimg_server.cli._env import int_option, option_or_env
from csvimg_server.cli._errors import EXIT_FAILED, EXIT_OK, UsageError
from csvimg_server.cli._options import add_backend_options, setup_logging, stats_interval
from csvimg_server.cli._worker import tune_pillow

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "add_serve_parser", "cmd_serve"]

log = logging.getLogger("csvimg.server")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000

_EXAMPLES = """\
examples:
  csvimg serve
      SQLite in ./csvimg-data/csvimg.db, images in ./csvimg-data/images/,
      one in-process worker loop, http://127.0.0.1:8000
  csvimg serve --host 0.0.0.0 --port 8080 --public-url https://img.example.com
  csvimg serve --workers 0 --storage redis://127.0.0.1:6379/0
      API only: 'csvimg worker' processes elsewhere do the images
  CSVIMG_DATA_DIR=/var/lib/csvimg csvimg serve --workers 2
  csvimg serve --log-format json --log-level warning --stats-interval 60
      JSON log lines (for a log collector), a throughput line every minute

then:
  open http://127.0.0.1:8000/ in a browser (the upload page), or:
  curl -F file=@products.csv http://127.0.0.1:8000/api/v1/upload
  curl http://127.0.0.1:8000/api/v1/status/<request_id>
  curl -OJ http://127.0.0.1:8000/api/v1/requests/<request_id>/output.csv
"""


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` subcommand to *sub*."""
    serve = sub.add_parser(
        "serve", help="run the HTTP API with in-process workers",
        description="Run the HTTP API (uvicorn) with in-process worker loops.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help=f"address to listen on (env CSVIMG_HOST; "
                                       f"default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, help=f"port (env CSVIMG_PORT; default {DEFAULT_PORT})")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="workers processing images (env CSVIMG_WORKERS; default: one per "
                            "core; 0 = API only): the first runs in the server process, the "
                            "others as 'csvimg worker' child processes on the same backends")
    serve.add_argument("--public-url", metavar="URL",
                       help="base of the URLs the API hands out, e.g. https://img.example.com "
                            "(env CSVIMG_PUBLIC_URL; default: the request's own host)")
    add_backend_options(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg serve``: the HTTP API with in-process workers, under uvicorn."""
    import uvicorn

    from csvimg_server._process import Tally, ThroughputLog
    from csvimg_server.app import create_app

    level = setup_logging(args, env)
    tune_pillow(env)
    interval = stats_interval(args, env, sys.stderr)
    host = option_or_env(args.host, env, "CSVIMG_HOST") or DEFAULT_HOST
    port = int_option(args.port, env, "CSVIMG_PORT", DEFAULT_PORT, 0)
    workers = int_option(args.workers, env, "CSVIMG_WORKERS", os.cpu_count() or 1, 0)
    settings = resolve_queue(backend_settings(args, env), env)
    # One Python process keeps about one core busy (the event loop's work
    # around the codec holds the GIL), so workers beyond the first run as
    # `csvimg worker` children on the same backends. memory:// cannot be
    # shared between processes: there every worker loop stays in here.
    shared = scheme_of(settings.storage_url) != "memory" and scheme_of(
        settings.effective_queue_url) != "memory"
    children = max(0, workers - 1) if shared else 0
    try:
        app = create_app(
            settings,
            workers=workers - children,
            shutdown_grace=args.shutdown_timeout,
            api_keys=env.get("CSVIMG_API_KEYS"),
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    tally = Tally()
    app.state.engine.on_item(tally.record)
    log.info(
        "csvimg serve: storage %s, queue %s, blobs %s, %d worker(s) (%d in child processes)",
        mask_password(settings.storage_url), mask_password(settings.effective_queue_url),
        mask_password(settings.blobs_url), workers, children,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=level,
        # uvicorn's lines go through the root logger that configure_logging
        # set up, so --log-format json covers them too.
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)),
        server_header=False,
    )
    server = uvicorn.Server(config)
    _quiet_signals()
    procs = start_worker_children(children, args, env, settings)
    try:
        with ThroughputLog(tally, interval, log):
            server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind or start the app
        return EXIT_FAILED if exc.code else EXIT_OK
    finally:
        stop_worker_children(procs, args.shutdown_timeout)
    return EXIT_OK if server.started else EXIT_FAILED


def _quiet_signals() -> None:
    """Make SIGTERM/SIGINT no-ops once a graceful shutdown is over.

    uvicorn re-raises the signal that stopped it after shutting down, to
    get the default behaviour; a clean stop should exit 0 instead.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
