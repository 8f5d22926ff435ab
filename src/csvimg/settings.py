"""Engine settings, from code or from ``CSVIMG_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from csvimg._errors import ConfigError
from csvimg._util import env_float, env_int, new_secret
from csvimg.codec import CodecLimits
from csvimg.fetch import FetchPolicy
from csvimg.jobs import ProcessOptions
from csvimg.manifest import ManifestLimits

__all__ = ["DEFAULT_WEBHOOK_SCHEDULE", "Settings"]

DEFAULT_WEBHOOK_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000)
"""Seconds to wait before each webhook retry: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h."""


def _schedule(raw: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in raw.split(",") if p.strip())
    except ValueError:
        raise ConfigError(
            f"CSVIMG_WEBHOOK_SCHEDULE must be comma-separated seconds, not {raw!r}"
        ) from None
    if any(v < 0 for v in values):
        raise ConfigError("CSVIMG_WEBHOOK_SCHEDULE must not hold negative numbers")
    return values


@attrs.frozen
class Settings:
    """Everything an `Engine` needs to know, with safe defaults.

    Backend URLs pick the backend by scheme (``memory://``,
    ``sqlite:///path.db``, ``redis://host:6379/0``, ``file:///dir``...).
    ``queue_url`` None means "the queue that goes with the storage": the
    queue the storage's plugin names, else the same URL as ``storage_url``
    (`csvimg.plugins.Plugins.queue_url`).
    """

    storage_url: str = "memory://"
    queue_url: str | None = None
    blobs_url: str = "memory://"
    notifier_url: str = "webhook://"
    public_url: str | None = None
    options: ProcessOptions = attrs.field(factory=ProcessOptions)
    manifest: ManifestLimits = attrs.field(factory=ManifestLimits)
    fetch: FetchPolicy = attrs.field(factory=FetchPolicy)
    codec: CodecLimits = attrs.field(factory=CodecLimits)
    concurrency: int = 32
    """Items one worker process handles at once (downloads overlap)."""
    codec_threads: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    """Threads compressing images; Pillow releases the GIL, so one per core."""
    lease_seconds: float = 60.0
    """How long a claimed item is held before another worker may take it."""
    max_attempts: int = 5
    """Attempts per item across retryable errors and worker deaths."""
    sweep_interval: float = 30.0
    """How often a worker looks for items that fell out of the queue."""
    stale_after: float = 900.0
    """How long an item may wait PENDING before the sweeper enqueues it again.

    Covers a process that died between storing a request and enqueuing it,
    and brokers that can drop a message (kombu's Redis transport when a
    worker is killed at the wrong instant). Longer than any normal backlog
    wait, since a re-enqueued id is only wasted work, never double counting.
    """
    webhook_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_SCHEDULE
    webhook_timeout: float = 15.0
    webhook_secret: str = attrs.field(factory=lambda: new_secret())
    """Deployment secret (``whsec_...``) from which per-request callback secrets derive."""
    outbox_interval: float = 1.0
    """How often the delivery loop looks for due outbox events."""

    @property
    def effective_queue_url(self) -> str:
        """The queue URL, defaulting to the storage URL.

        Does not know the plugins: a storage registered with a queue of its
        own (``add_storage(..., queue="memory")``) gets that queue from
        `csvimg.plugins.Plugins.queue_url`, which the engine and the command
        line use.
        """
        return self.queue_url or self.storage_url

    def evolve(self, **changes: Any) -> Settings:
        """Return a copy with *changes*."""
        return attrs.evolve(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``CSVIMG_*`` variables; *overrides* win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, name in (
            ("storage_url", "CSVIMG_STORAGE"),
            ("queue_url", "CSVIMG_QUEUE"),
            ("blobs_url", "CSVIMG_BLOBS"),
            ("notifier_url", "CSVIMG_NOTIFIER"),
            ("public_url", "CSVIMG_PUBLIC_URL"),
        ):
            if env.get(name):
                values[key] = env[name]
        quality = env_int(env, "CSVIMG_QUALITY", 50)
        fmt = env.get("CSVIMG_FORMAT", "JPEG")
        max_dim = env_int(env, "CSVIMG_MAX_DIMENSION", 0) or None
        try:
            values["options"] = ProcessOptions(quality=quality, format=fmt, max_dimension=max_dim)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        values["manifest"] = ManifestLimits.from_env(env)
        values["fetch"] = FetchPolicy.from_env(env)
        values["codec"] = CodecLimits.from_env(env)
        values["concurrency"] = max(1, env_int(env, "CSVIMG_CONCURRENCY", 32))
        values["codec_threads"] = max(1, env_int(env, "CSVIMG_CODEC_THREADS", os.cpu_count() or 1))
        values["lease_seconds"] = env_float(env, "CSVIMG_LEASE_SECONDS", 60.0)
        values["stale_after"] = env_float(env, "CSVIMG_STALE_AFTER", 900.0)
        values["max_attempts"] = max(1, env_int(env, "CSVIMG_MAX_ATTEMPTS", 5))
        values["webhook_timeout"] = env_float(env, "CSVIMG_WEBHOOK_TIMEOUT", 15.0)
        if env.get("CSVIMG_WEBHOOK_SECRET"):
            values["webhook_secret"] = env["CSVIMG_WEBHOOK_SECRET"]
        if env.get("CSVIMG_WEBHOOK_SCHEDULE"):
            values["webhook_schedule"] = _schedule(env["CSVIMG_WEBHOOK_SCHEDULE"])
        values.update(overrides)
        return cls(**values)
