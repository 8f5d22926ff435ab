"""The ``csvimg worker`` child processes that ``serve --workers N`` runs beside itself.

One Python process keeps about one core busy (the event loop's work
around the codec holds the GIL), so workers beyond the first run as
children on the same backends; they stop with the server, and with it
when it dies.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from csvimg.settings import Settings
from csvimg_server.cli._backends import data_dir

__all__ = ["start_worker_children", "stop_worker_children"]

log = logging.getLogger("csvimg.server")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM this child when its parent dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: children are still stopped on a normal exit


def start_worker_children(
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
            "--data-dir", str(data_dir(args, env)),
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


def stop_worker_children(procs: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
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
