"""Webhook delivery: the built-in notifier (``webhook://``).

Events are sent the way the Standard Webhooks specification says, so any
receiver library (``standardwebhooks``, Svix...) can verify them:

* headers ``webhook-id`` (the event id, the same on every retry, for
  deduplication), ``webhook-timestamp`` (Unix seconds of this attempt) and
  ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``
  under the receiver's ``whsec_`` secret);
* body ``{"type", "timestamp", "data": {"request_id", "status", "progress",
  "output_csv_url"}}``.

Receivers are the request's own ``callback_url`` (signed with a secret
derived from the deployment's webhook secret and the request id, see
`request_secret`) and every active registration of the request's owner.

Each delivery round sends to every receiver that has not yet accepted the
event nor refused it for good. Timeouts, connection errors, 408, 429 and
5xx are retried on the schedule in `Settings.webhook_schedule` with
jitter (``Retry-After`` honoured); other 4xx and refused addresses are
final; ``410 Gone`` also disables the registration. Redirects are not
followed and the SSRF guard applies at delivery time. Every attempt is
recorded in storage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import attrs

from csvimg._errors import CallbackUrlError, ConfigError, FetchError
from csvimg._util import new_secret, parse_retry_after
from csvimg.fetch import FetchPolicy, check_url, resolve_checked
from csvimg.hooks import BackendRegistry, hookimpl
from csvimg.jobs import Delivery, Event, Request, Webhook, now
from csvimg.settings import Settings

if TYPE_CHECKING:
    from csvimg.engine import Engine
    from csvimg.fetch import Fetcher

__all__ = [
    "SECRET_PREFIX",
    "WEBHOOK_ID_PREFIX",
    "WebhookNotifier",
    "check_callback_url",
    "event_payload",
    "is_webhook_id",
    "new_secret",
    "new_webhook_id",
    "request_secret",
    "sign",
]

log = logging.getLogger("csvimg.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
"""Standard Webhooks secrets are ``whsec_`` + base64 of the key bytes."""

WEBHOOK_ID_PREFIX: Final = "wh_"
"""Webhook registration ids are ``wh_`` + hex (`new_webhook_id`)."""

_WEBHOOK_ID: Final = re.compile(r"wh_[0-9a-f]{1,64}\Z")

# A receiver may ask for a long pause: up to a day is honoured.
_MAX_RETRY_AFTER = 86400.0
_FINAL_ERRORS = frozenset({"blocked-address", "bad-scheme", "bad-url"})


def new_webhook_id() -> str:
    """Return a fresh webhook registration id (``wh_`` + 24 hex digits)."""
    return WEBHOOK_ID_PREFIX + secrets.token_hex(12)


def is_webhook_id(raw: str) -> bool:
    """Whether *raw* has the form of a webhook registration id (``wh_`` + 1 to 64 hex digits)."""
    return _WEBHOOK_ID.match(raw) is not None


async def check_callback_url(url: str, policy: FetchPolicy) -> str:
    """Validate a receiver URL and return it normalised; `CallbackUrlError` if refused.

    The URL must be http(s) and its host must resolve only to addresses
    *policy* (the SSRF guard of `csvimg.fetch`) allows. The guard applies
    again at every delivery.
    """
    try:
        parts = check_url(url)
        assert parts.hostname is not None  # check_url refuses URLs without a host
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await resolve_checked(parts.hostname, port, policy)
    except FetchError as exc:
        raise CallbackUrlError(exc.code, exc.message) from None
    return parts.geturl()


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        raise ConfigError("a webhook secret must be 'whsec_' followed by base64") from None


def request_secret(deployment_secret: str, request_id: str) -> str:
    """The secret that signs events sent to one request's ``callback_url``.

    Derived (HMAC) from the deployment's secret, so nothing more is stored
    and a secret given to one uploader says nothing about another's.
    """
    digest = hmac.new(_key(deployment_secret), request_id.encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` header value for one attempt."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def event_payload(event: Event, request: Request, output_csv_url: str | None) -> dict[str, Any]:
    """Build the JSON body of an event."""
    return {
        "type": event.type,
        "timestamp": _iso(event.created_at),
        "data": {
            "request_id": request.id,
            "status": request.status.value,
            "progress": {"total": request.total, "done": request.done, "failed": request.failed},
            "output_csv_url": output_csv_url,
        },
    }


@attrs.frozen
class _Target:
    url: str
    secret: str
    webhook_id: str | None = None


def _is_final(delivery: Delivery) -> bool:
    """Whether a receiver's answer ends delivery to it (success or for good)."""
    if delivery.ok:
        return True
    code = delivery.status_code
    if code is not None:
        return 400 <= code < 500 and code not in (408, 429)
    return (delivery.error or "").split(":", 1)[0] in _FINAL_ERRORS


class WebhookNotifier:
    """Sends events to webhook receivers; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._fetcher: Fetcher | None = None
        self._on_delivery: list[Callable[[Delivery], Any]] = []

    def on_delivery(self, callback: Callable[[Delivery], Any]) -> None:
        """Call *callback(delivery)* after each attempt is recorded (e.g. for metrics)."""
        self._on_delivery.append(callback)

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> WebhookNotifier:
        """Build from ``webhook://`` (the URL carries nothing else)."""
        return cls(settings)

    def bind(self, engine: Engine) -> None:
        """Attach to the engine whose storage records the attempts."""
        self._engine = engine

    async def open(self) -> None:
        """Create the guarded HTTP client."""
        if self._fetcher is None:
            from csvimg.fetch import Fetcher  # aiohttp loads on first delivery

            self._fetcher = Fetcher(self.settings.fetch)
            await self._fetcher.__aenter__()

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._fetcher is not None:
            await self._fetcher.__aexit__(None, None, None)
            self._fetcher = None

    def _output_csv_url(self, request: Request) -> str | None:
        assert self._engine is not None
        return self._engine.output_csv_url(request.id)

    async def _targets(self, request: Request) -> list[_Target]:
        assert self._engine is not None
        targets: list[_Target] = []
        if request.callback_url:
            secret = self.settings.webhook_secret
            targets.append(_Target(request.callback_url, request_secret(secret, request.id)))
        hooks: list[Webhook] = await self._engine.storage.list_webhooks(owner=request.owner)
        targets.extend(_Target(h.url, h.secret, h.id) for h in hooks if h.active)
        return targets

    async def deliver(self, event: Event, request: Request) -> float | None:
        """Make one delivery round; return when the next is due, or None."""
        if self._engine is None:
            raise ConfigError("WebhookNotifier.deliver needs bind(engine) first")
        await self.open()
        storage = self._engine.storage
        past = [d for d in await storage.list_deliveries(request.id) if d.event_id == event.id]
        settled = {(d.webhook_id, d.url) for d in past if _is_final(d)}
        tries: dict[tuple[str | None, str], int] = {}
        for d in past:
            tries[(d.webhook_id, d.url)] = tries.get((d.webhook_id, d.url), 0) + 1
        body = json.dumps(
            event_payload(event, request, self._output_csv_url(request)), separators=(",", ":")
        ).encode()
        retry_after: float = 0.0
        pending = False
        for target in await self._targets(request):
            key = (target.webhook_id, target.url)
            if key in settled:
                continue
            attempt = tries.get(key, 0) + 1
            delivery, wait = await self._send(event, target, body, attempt)
            await storage.add_delivery(request.id, delivery)
            for callback in self._on_delivery:
                callback(delivery)
            if delivery.status_code == 410 and target.webhook_id is not None:
                await storage.set_webhook_active(target.webhook_id, False)
                log.warning("webhook %s answered 410 Gone: disabled", target.webhook_id,
                            extra={"event_id": event.id, "request_id": request.id})
            if not _is_final(delivery):
                if attempt > len(self.settings.webhook_schedule):
                    log.warning("event %s: giving up on a receiver after %d attempts",
                                event.id, attempt,
                                extra={"event_id": event.id, "request_id": request.id})
                    continue
                pending = True
                retry_after = max(retry_after, wait or 0.0)
        if not pending:
            return None
        schedule = self.settings.webhook_schedule
        step = schedule[min(event.attempts, len(schedule) - 1)]
        delay = max(step * random.uniform(0.9, 1.1), retry_after)
        return now() + delay

    async def _send(
        self, event: Event, target: _Target, body: bytes, attempt: int
    ) -> tuple[Delivery, float | None]:
        assert self._fetcher is not None
        ts = int(now())
        headers = {
            "content-type": "application/json",
            "user-agent": self.settings.fetch.user_agent,
            "webhook-id": event.id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(target.secret, event.id, ts, body),
        }
        status: int | None = None
        error: str | None = None
        wait: float | None = None
        try:
            response = await self._fetcher.send(
                "POST", target.url, content=body, headers=headers,
                timeout=self.settings.webhook_timeout,
            )
        except FetchError as exc:
            error = f"{exc.code}: {exc.message}"
        else:
            status = response.status_code
            if not 200 <= status < 300:
                error = f"http-{status}"
                wait = parse_retry_after(
                    response.headers.get("retry-after"), now=now(), cap=_MAX_RETRY_AFTER
                )
        log.info("event %s attempt %d: %s", event.id, attempt, status if error is None else error,
                 extra={"event_id": event.id, "request_id": event.request_id})
        delivery = Delivery(
            event_id=event.id, url=target.url, attempt=attempt, at=now(),
            status_code=status, error=error, webhook_id=target.webhook_id,
        )
        return delivery, wait


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``webhook://`` as the notifier."""
    registry.add_notifier("webhook", WebhookNotifier.from_url)
