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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO
from urllib.parse import quote

import anyio

from csvimg._errors import ConfigError, ManifestError, StorageError
from csvimg.plugins import scheme_of
from csvimg.settings import Settings

if TYPE_CHECKING:
    import httpx

    from csvimg_server._process import Tally

__all__ = ["build_parser", "main"]

log = logging.getLogger("csvimg.server")

DEFAULT_DATA_DIR: Final = "csvimg-data"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
DEFAULT_SERVER: Final = "http://127.0.0.1:8000"
SHUTDOWN_TIMEOUT: Final = 30.0
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: Final = ("text", "json")
DEFAULT_STATS_INTERVAL: Final = 10.0
"""Seconds between throughput lines of ``serve``/``worker`` when stderr is a terminal."""
STATUS_INTERVAL: Final = 1.0
"""Seconds between polls of ``csvimg status --watch``."""

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class UsageError(Exception):
    """A bad option or environment variable: print it and exit 2."""


# ------------------------------------------------------------------ options


def _env_or(value: Any, env: Mapping[str, str], name: str) -> Any:
    """Return the option if given, else the environment variable (None if unset)."""
    if value is not None:
        return value
    raw = env.get(name, "").strip()
    return raw or None


def _int_option(value: Any, env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = _env_or(value, env, name)
    if raw is None:
        return default
    try:
        number = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {raw!r}") from None
    if number < low:
        raise UsageError(f"{name} must be at least {low}, not {number}")
    return number


def _data_dir(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    raw = _env_or(args.data_dir, env, "CSVIMG_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(raw).expanduser().absolute()


def _backend_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Build the settings of ``serve`` and ``worker``: backends from options, env or data dir."""
    overrides: dict[str, Any] = {}
    data_dir = _data_dir(args, env)
    storage = _env_or(args.storage, env, "CSVIMG_STORAGE")
    blobs = _env_or(args.blobs, env, "CSVIMG_BLOBS")
    queue = _env_or(args.queue, env, "CSVIMG_QUEUE")
    if storage is None or blobs is None:
        # The embedded default lives in the data folder; create it so SQLite
        # and the blob store find their parent directory.
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the data folder {data_dir}: {exc}") from None
    overrides["storage_url"] = storage or f"sqlite:///{data_dir / 'csvimg.db'}"
    overrides["blobs_url"] = blobs or f"file://{data_dir / 'images'}"
    overrides["queue_url"] = queue
    if not env.get("CSVIMG_WEBHOOK_SECRET"):
        overrides["webhook_secret"] = _webhook_secret(data_dir)
    if getattr(args, "public_url", None):
        overrides["public_url"] = args.public_url
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise UsageError(f"--concurrency must be at least 1, not {args.concurrency}")
        overrides["concurrency"] = args.concurrency
    try:
        return Settings.from_env(env, **overrides)
    except (ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _webhook_secret(data_dir: Path) -> str:
    """Return the deployment's webhook secret kept in the data folder, made once.

    Callback secrets derive from it, so it must outlive restarts and be the
    same for ``serve`` and every ``worker`` of a deployment; a folder shared
    by them is where the embedded default keeps it. (Deployments without a
    shared folder set ``CSVIMG_WEBHOOK_SECRET``.)
    """
    from csvimg.webhooks import new_secret

    path = data_dir / "webhook-secret"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: of two processes starting at once, one writes, both read.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fp:
                fp.write(new_secret() + "\n")
        for _ in range(50):
            secret = path.read_text().strip()
            if secret:
                return secret
            time.sleep(0.01)  # the other process is between create and write
    except OSError as exc:
        raise UsageError(f"cannot keep the webhook secret in {path}: {exc}") from None
    raise UsageError(f"{path} is empty: delete it or set CSVIMG_WEBHOOK_SECRET")


def _choice(value: str | None, env: Mapping[str, str], name: str, default: str,
            allowed: Sequence[str]) -> str:
    chosen = (value or env.get(name, "").strip() or default).lower()
    if chosen not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(allowed)}, not {chosen!r}")
    return chosen


def _setup_logging(args: argparse.Namespace, env: Mapping[str, str], default: str = "info") -> str:
    """Apply ``--log-level``/``--log-format`` (or their variables); return the level."""
    level = _choice(args.log_level, env, "CSVIMG_LOG_LEVEL", default, LOG_LEVELS)
    fmt = _choice(args.log_format, env, "CSVIMG_LOG_FORMAT", "text", LOG_FORMATS)
    from csvimg_server.logs import configure_logging

    try:
        configure_logging(level, fmt)
    except ValueError as exc:  # pragma: no cover - both were checked above
        raise UsageError(str(exc)) from None
    return level


def _stats_interval(args: argparse.Namespace, env: Mapping[str, str], stream: TextIO) -> float:
    """Seconds between throughput lines: option, variable, else 10 on a terminal, 0 (off)."""
    raw = _env_or(args.stats_interval, env, "CSVIMG_STATS_INTERVAL")
    if raw is None:
        return DEFAULT_STATS_INTERVAL if _isatty(stream) else 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(
            f"--stats-interval / CSVIMG_STATS_INTERVAL must be a number of seconds >= 0, "
            f"not {raw!r}"
        )
    return value


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


def _quiet_signals() -> None:
    """Make SIGTERM/SIGINT no-ops once a graceful shutdown is over.

    uvicorn re-raises the signal that stopped it after shutting down, to
    get the default behaviour; a clean stop should exit 0 instead.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)


# ---------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg serve``: the HTTP API with in-process workers, under uvicorn."""
    import uvicorn

    from csvimg_server._process import Tally, ThroughputLog
    from csvimg_server.app import create_app

    level = _setup_logging(args, env)
    _tune_pillow(env)
    interval = _stats_interval(args, env, sys.stderr)
    host = _env_or(args.host, env, "CSVIMG_HOST") or DEFAULT_HOST
    port = _int_option(args.port, env, "CSVIMG_PORT", DEFAULT_PORT, 0)
    workers = _int_option(args.workers, env, "CSVIMG_WORKERS", os.cpu_count() or 1, 0)
    settings = _backend_settings(args, env)
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
        _redact(settings.storage_url), _redact(settings.effective_queue_url),
        _redact(settings.blobs_url), workers, children,
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
    procs = _start_worker_children(children, args, env, settings)
    try:
        with ThroughputLog(tally, interval, log):
            server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind or start the app
        return EXIT_FAILED if exc.code else EXIT_OK
    finally:
        _stop_worker_children(procs, args.shutdown_timeout)
    return EXIT_OK if server.started else EXIT_FAILED


def _tune_pillow(env: Mapping[str, str]) -> None:
    """Let Pillow keep freed image blocks for reuse (``PILLOW_BLOCKS_MAX``).

    Pillow maps fresh memory for every image by default; keeping 16 blocks
    measured 12 MP peaks at 314-319 MB instead of 370-429 MB (bench/).
    An explicit ``PILLOW_BLOCKS_MAX`` wins: Pillow has read it already.
    """
    if "PILLOW_BLOCKS_MAX" not in env:
        from PIL import _imaging  # the C core that Image.core names

        _imaging.set_blocks_max(16)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM this child when its parent dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: children are still stopped on a normal exit


def _start_worker_children(
    count: int, args: argparse.Namespace, env: Mapping[str, str], settings: Settings
) -> list[subprocess.Popen[bytes]]:
    """Start *count* ``csvimg worker`` processes on the server's backends.

    Backend URLs travel in the environment, not the command line, where
    any user could read a password from the process list.
    """
    if count <= 0:
        return []
    child_env = {
        **env,
        "CSVIMG_STORAGE": settings.storage_url,
        "CSVIMG_QUEUE": settings.effective_queue_url,
        "CSVIMG_BLOBS": settings.blobs_url,
        "CSVIMG_WEBHOOK_SECRET": settings.webhook_secret,
        "CSVIMG_CONCURRENCY": str(settings.concurrency),
    }
    if settings.public_url:
        child_env["CSVIMG_PUBLIC_URL"] = settings.public_url
    argv = [sys.executable, "-m", "csvimg_server", "worker",
            "--data-dir", str(_data_dir(args, env)),
            "--shutdown-timeout", str(args.shutdown_timeout)]
    for option in ("log_level", "log_format", "stats_interval"):
        value = getattr(args, option, None)
        if value is not None:
            argv += ["--" + option.replace("_", "-"), str(value)]
    procs = [
        subprocess.Popen(argv, env=child_env, preexec_fn=_die_with_parent)  # noqa: S603
        for _ in range(count)
    ]
    log.info("started %d worker process(es): pids %s", count, ", ".join(str(p.pid) for p in procs))
    return procs


def _stop_worker_children(procs: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM the children (they finish in-flight images), then wait; SIGKILL late ones."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not stop in time: killed", proc.pid)
            proc.kill()
            proc.wait()


def _redact(url: str) -> str:
    """Hide a password in a backend URL before logging it."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, hostpart = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


def cmd_worker(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg worker``: process queued images until SIGTERM/SIGINT."""
    from csvimg_server._process import Tally, ThroughputLog

    _setup_logging(args, env)
    _tune_pillow(env)
    interval = _stats_interval(args, env, sys.stderr)
    settings = _backend_settings(args, env)
    tally = Tally()
    try:
        with ThroughputLog(tally, interval, log):
            anyio.run(_worker, settings, args.shutdown_timeout, tally)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except StorageError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED
    return EXIT_OK


async def _worker(settings: Settings, grace: float, tally: Tally) -> None:
    from csvimg.engine import Engine

    engine = Engine(settings)
    engine.on_item(tally.record)
    async with engine:
        stop = anyio.Event()
        log.info(
            "csvimg worker %s: storage %s, queue %s, concurrency %d",
            engine.consumer, _redact(settings.storage_url),
            _redact(settings.effective_queue_url), settings.concurrency,
        )
        async with anyio.create_task_group() as tg:

            async def deadline() -> None:
                await anyio.sleep(grace)
                log.warning("in-flight items did not finish in %g s: abandoning them "
                            "(their leases hand them to another worker)", grace)
                tg.cancel_scope.cancel()

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        if stop.is_set():  # a second signal: stop now
                            log.warning("%s again: stopping now; in-flight items go back to "
                                        "the queue when their leases end",
                                        signal.Signals(signum).name)
                            tg.cancel_scope.cancel()
                            return
                        log.info("%s: no new items; finishing the ones in flight",
                                 signal.Signals(signum).name)
                        stop.set()
                        tg.start_soon(deadline)

            tg.start_soon(watch_signals)
            await engine.run_worker(stop=stop)
            tg.cancel_scope.cancel()
        log.info("csvimg worker stopped")


def cmd_process(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg process``: one-shot local run of a CSV into a folder."""
    from csvimg_server._process import run_process

    # Failed images are listed in the summary; their per-item warnings would
    # only repeat them (and cut through the progress bar), hence "error".
    _setup_logging(args, env, default="error")
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


class _StatusError(Exception):
    """The status could not be had: print the message, exit 1."""


def _fetch_status(client: httpx.Client, url: str, server: str, *, keyed: bool) -> dict[str, Any]:
    import httpx

    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        raise _StatusError(f"cannot reach {server}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"error": response.text[:200]}
    if response.status_code == 200:
        return body
    message = body.get("error", body)
    if response.status_code == 401:
        hint = ("the server refused the API key" if keyed else
                "the server needs an API key: pass --api-key or set CSVIMG_API_KEY")
        raise _StatusError(f"401: {hint} ({message})")
    raise _StatusError(f"{response.status_code}: {message}")


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


_STATUS_STYLE: Final = {"COMPLETED": "bold green", "FAILED": "bold red",
                        "PROCESSING": "bold yellow", "PENDING": "bold"}


def _print_status(body: Mapping[str, Any], stream: TextIO) -> None:
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


def _watch(client: httpx.Client, url: str, server: str, body: dict[str, Any], *,
           keyed: bool, interval: float, stream: TextIO) -> dict[str, Any]:
    """Poll until the request finished: a progress bar on a terminal, else lines."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    def finished(b: Mapping[str, Any]) -> bool:
        return b.get("status") in ("COMPLETED", "FAILED")

    def poll() -> dict[str, Any]:
        time.sleep(interval)
        return _fetch_status(client, url, server, keyed=keyed)

    if _isatty(stream):
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


def cmd_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg status``: ask a running server about a request (``--watch``: until done)."""
    import httpx

    server = (args.server or env.get("CSVIMG_SERVER") or DEFAULT_SERVER).rstrip("/")
    url = f"{server}/api/v1/status/{quote(args.request_id, safe='')}"
    key = args.api_key or env.get("CSVIMG_API_KEY", "").strip() or None
    if args.interval <= 0:
        raise UsageError(f"--interval must be positive, not {args.interval:g}")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(timeout=10.0, headers=headers) as client:
            body = _fetch_status(client, url, server, keyed=key is not None)
            if args.watch:
                # With --json, stdout is kept for the JSON alone.
                body = _watch(client, url, server, body, keyed=key is not None,
                              interval=args.interval,
                              stream=sys.stderr if args.json else sys.stdout)
    except _StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        _print_status(body, sys.stdout)
    if args.watch and body.get("status") == "FAILED":
        return EXIT_FAILED
    return EXIT_OK


# ------------------------------------------------------------------ parser

_SERVE_EXAMPLES = """\
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

_WORKER_EXAMPLES = """\
examples:
  csvimg worker
      works on ./csvimg-data (the same default as 'csvimg serve')
  csvimg worker --storage redis://10.0.0.5:6379/0 --blobs file:///mnt/shared/images
  CSVIMG_STORAGE=sqlite:////var/lib/csvimg/csvimg.db csvimg worker --concurrency 64
  csvimg worker --log-format json --stats-interval 30

SIGTERM or Ctrl+C: stop claiming images, let the ones in flight finish
(at most --shutdown-timeout seconds; the rest go back to the queue), exit 0.
"""

_PROCESS_EXAMPLES = """\
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

_VALIDATE_EXAMPLES = """\
examples:
  csvimg validate products.csv
      prints 'OK: N rows, M images' (exit 0) or a table of every problem
      (row, column, code, message; exit 1)
  CSVIMG_MAX_ROWS=500 csvimg validate products.csv
      with the limits the server will apply (CSVIMG_MAX_* variables)
"""

_STATUS_EXAMPLES = """\
examples:
  csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11
  csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11 --watch
      a progress bar until the request finished, then the status
  csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11 --server http://img.internal:8000 --json
  CSVIMG_API_KEY=... csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11
      a server with API keys (or --api-key KEY; the env keeps it out of 'ps')

exit status: 0 when the status was read (with --watch: when the request
COMPLETED), 1 when it could not be read or (with --watch) every image FAILED.
"""

_MAIN_EXAMPLES = """\
examples:
  csvimg serve                             start the server (SQLite + local files)
  csvimg process products.csv --out out/   compress a CSV's images locally
  csvimg validate products.csv             check a CSV
  csvimg status <request_id> --watch       follow a request on a server
  csvimg <command> --help                  options and examples of a command
"""


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
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
    _add_logging_options(parser, "info")
    parser.add_argument("--stats-interval", type=float, metavar="SECONDS",
                        help="log a throughput line (images/s, failed, bytes saved) every "
                             "SECONDS while images finish; 0 = never (env "
                             f"CSVIMG_STATS_INTERVAL; default {DEFAULT_STATS_INTERVAL:g} when "
                             "stderr is a terminal, else 0)")


def _add_logging_options(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower,
                       help=f"log level (env CSVIMG_LOG_LEVEL; default {default})")
    group.add_argument("--log-format", choices=LOG_FORMATS, type=str.lower,
                       help="log lines as text or one JSON object per line "
                            "(env CSVIMG_LOG_FORMAT; default text)")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``csvimg`` argument parser (one subcommand per command)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="csvimg",
        description="Compress the images listed in a CSV: as an HTTP service "
                    "(serve, worker) or locally (process).",
        epilog=_MAIN_EXAMPLES,
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="run the HTTP API with in-process workers",
        description="Run the HTTP API (uvicorn) with in-process worker loops.",
        epilog=_SERVE_EXAMPLES, formatter_class=formatter,
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
    _add_backend_options(serve)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser(
        "worker", help="process queued images (scale-out)",
        description="Process queued images until SIGTERM or Ctrl+C.",
        epilog=_WORKER_EXAMPLES, formatter_class=formatter,
    )
    _add_backend_options(worker)
    worker.set_defaults(func=cmd_worker)

    process = sub.add_parser(
        "process", help="compress a CSV's images into a folder, locally",
        description="One-shot local run: download and compress every image of FILE.csv "
                    "into DIR/images/ and write DIR/<name>-output.csv.",
        epilog=_PROCESS_EXAMPLES, formatter_class=formatter,
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
    _add_logging_options(process, "error")
    process.set_defaults(func=cmd_process)

    validate = sub.add_parser(
        "validate", help="check a CSV without processing it",
        description="Validate FILE.csv: list every problem (row, column, code, message).",
        epilog=_VALIDATE_EXAMPLES, formatter_class=formatter,
    )
    validate.add_argument("file", metavar="FILE.csv", help="the CSV to check")
    validate.set_defaults(func=cmd_validate)

    status = sub.add_parser(
        "status", help="show a request's status from a running server",
        description="Print the status of a request from a running csvimg server:\n"
                    "progress, times and the output CSV's URL.",
        epilog=_STATUS_EXAMPLES, formatter_class=formatter,
    )
    status.add_argument("request_id", metavar="ID", help="the request id")
    status.add_argument("--server", metavar="URL",
                        help=f"server base URL (env CSVIMG_SERVER; default {DEFAULT_SERVER})")
    status.add_argument("--api-key", metavar="KEY",
                        help="send 'Authorization: Bearer KEY' (env CSVIMG_API_KEY)")
    status.add_argument("--watch", action="store_true",
                        help="poll until the request finished, showing its progress")
    status.add_argument("--interval", type=float, default=STATUS_INTERVAL, metavar="SECONDS",
                        help=f"seconds between polls with --watch (default {STATUS_INTERVAL:g})")
    status.add_argument("--json", action="store_true", help="print the raw JSON answer")
    status.set_defaults(func=cmd_status)
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
        _print_error(parser.prog, args.command, str(exc), sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _print_error(prog: str, command: str, message: str, stream: TextIO) -> None:
    print(f"{prog} {command}: error: {message}", file=stream)
