"""The backends ``serve`` and ``worker`` run on: options, variables or the data folder.

With no configuration at all, ``serve`` and ``worker`` share
``./csvimg-data/``: the SQLite database ``csvimg.db`` (storage and queue),
the image folder ``images/`` and the deployment's ``webhook-secret``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from csvimg._errors import ConfigError
from csvimg.plugins import Plugins
from csvimg.settings import Settings
from csvimg_server.cli._env import option_or_env
from csvimg_server.cli._errors import UsageError

__all__ = ["DEFAULT_DATA_DIR", "backend_settings", "data_dir", "resolve_queue", "webhook_secret"]

DEFAULT_DATA_DIR: Final = "csvimg-data"


def data_dir(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    """The data folder: ``--data-dir``, ``CSVIMG_DATA_DIR`` or ``./csvimg-data``, absolute."""
    raw = option_or_env(args.data_dir, env, "CSVIMG_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(raw).expanduser().absolute()


def backend_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Build the settings of ``serve`` and ``worker``: backends from options, env or data dir."""
    overrides: dict[str, Any] = {}
    folder = data_dir(args, env)
    storage = option_or_env(args.storage, env, "CSVIMG_STORAGE")
    blobs = option_or_env(args.blobs, env, "CSVIMG_BLOBS")
    queue = option_or_env(args.queue, env, "CSVIMG_QUEUE")
    if storage is None or blobs is None:
        # The embedded default lives in the data folder; create it so SQLite
        # and the blob store find their parent directory.
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the data folder {folder}: {exc}") from None
    overrides["storage_url"] = storage or f"sqlite:///{folder / 'csvimg.db'}"
    overrides["blobs_url"] = blobs or f"file://{folder / 'images'}"
    overrides["queue_url"] = queue
    # The same test as Settings.from_env's: when it will not read a secret
    # from the environment, the data folder supplies one.
    if not env.get("CSVIMG_WEBHOOK_SECRET"):
        overrides["webhook_secret"] = webhook_secret(folder)
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


def resolve_queue(settings: Settings, env: Mapping[str, str]) -> Settings:
    """*settings* with the queue URL the engine will use made explicit.

    `csvimg.plugins.Plugins.queue_url` decides (the storage plugin's queue
    when none is configured), so that ``serve`` sees the same queue as its
    engine and hands it to its worker children.
    """
    try:
        return settings.evolve(queue_url=Plugins(environ=env).queue_url(settings))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def webhook_secret(folder: Path) -> str:
    """Return the deployment's webhook secret kept in the data folder, made once.

    Callback secrets derive from it, so it must outlive restarts and be the
    same for ``serve`` and every ``worker`` of a deployment; a folder shared
    by them is where the embedded default keeps it. (Deployments without a
    shared folder set ``CSVIMG_WEBHOOK_SECRET``.)
    """
    from csvimg.webhooks import new_secret

    path = folder / "webhook-secret"
    try:
        folder.mkdir(parents=True, exist_ok=True)
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
