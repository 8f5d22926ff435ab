"""Webhook delivery: Standard Webhooks signatures, retries, 410, SSRF, outbox."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import anyio
import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook

from csvimg import Engine, Settings
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.jobs import Webhook, now
from csvimg.testing import claim_events
from csvimg.webhooks import new_secret, request_secret, sign
from images import photo_jpeg
from servers import ImageHost, RecordedRequest, Reply

pytestmark = pytest.mark.anyio


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with ImageHost() as h:
        h.add("/a.jpg", photo_jpeg(320, 240), content_type="image/jpeg")
        yield h


def _csv(url: str) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows([["S. No.", "Product Name", "Input Image Urls"], ["1", "A", url]])
    return buf.getvalue().encode()


def _settings(*allowed: ImageHost, schedule: tuple[float, ...] = (0.05, 0.05, 0.05)) -> Settings:
    allow = ",".join(h.allow for h in allowed)
    return Settings(
        fetch=FetchPolicy(allow=parse_allow(allow), retries=0),
        public_url="http://csvimg.test",
        webhook_schedule=schedule,
        outbox_interval=0.05,
    )


def _headers(request: RecordedRequest) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers}


async def _run_until(engine: Engine, condition: object, timeout: float = 20) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: engine.run_worker(claim_wait=0.1))
        with anyio.fail_after(timeout):
            while not await condition():  # type: ignore[operator]  # noqa: ASYNC110 - polling storage
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()


def test_signature_matches_the_specification() -> None:
    secret = new_secret()
    body = b'{"type":"request.completed"}'
    # the independent implementation checks the timestamp against now: use now
    ts = int(now())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, "msg_1", ts, body),
    }
    assert StandardWebhook(secret).verify(body, headers) == {"type": "request.completed"}
    other = request_secret(secret, "r1")
    assert other.startswith("whsec_") and other != request_secret(secret, "r2")


async def test_registered_webhook_gets_a_verifiable_event(host: ImageHost) -> None:
    with ImageHost() as receiver:
        receiver.add("/hook", status=204)
        async with Engine(_settings(host, receiver)) as engine:
            secret = new_secret()
            await engine.storage.add_webhook(Webhook(id="wh_1", url=receiver.url("/hook"),
                                                     secret=secret))
            request = await engine.submit(_csv(host.url("/a.jpg")))

            async def delivered() -> bool:
                return len(receiver.requests) >= 1

            await _run_until(engine, delivered)
            [got] = receiver.requests
            payload = StandardWebhook(secret).verify(got.body, _headers(got))
            assert payload["type"] == "request.completed"
            assert payload["data"] == {
                "request_id": request.id,
                "status": "COMPLETED",
                "progress": {"total": 1, "done": 1, "failed": 0},
                "output_csv_url": f"http://csvimg.test/api/v1/requests/{request.id}/output.csv",
            }
            [attempt] = await engine.storage.list_deliveries(request.id)
            assert attempt.status_code == 204 and attempt.ok


async def test_retries_keep_the_same_webhook_id(host: ImageHost) -> None:
    with ImageHost() as receiver:
        receiver.add("/hook", replies=[Reply(status=500), Reply(status=500), Reply(status=200)])
        async with Engine(_settings(host, receiver)) as engine:
            request = await engine.submit(
                _csv(host.url("/a.jpg")), callback_url=receiver.url("/hook")
            )

            async def three() -> bool:
                return len(await engine.storage.list_deliveries(request.id)) >= 3

            await _run_until(engine, three)
            await anyio.sleep(0.3)  # no fourth attempt after the 200
            ids = {_headers(r)["webhook-id"] for r in receiver.requests}
            assert len(receiver.requests) == 3 and len(ids) == 1
            attempts = await engine.storage.list_deliveries(request.id)
            assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
            # per-request callbacks are signed with the request's derived secret
            secret = request_secret(engine.settings.webhook_secret, request.id)
            last = receiver.requests[-1]
            StandardWebhook(secret).verify(last.body, _headers(last))


async def test_gone_disables_the_registration(host: ImageHost) -> None:
    with ImageHost() as receiver:
        receiver.add("/hook", status=410)
        async with Engine(_settings(host, receiver)) as engine:
            await engine.storage.add_webhook(
                Webhook(id="wh_gone", url=receiver.url("/hook"), secret=new_secret())
            )
            request = await engine.submit(_csv(host.url("/a.jpg")))

            async def disabled() -> bool:
                [hook] = await engine.storage.list_webhooks()
                return not hook.active

            await _run_until(engine, disabled)
            await anyio.sleep(0.3)
            assert len(receiver.requests) == 1  # 410 is final: no retry
            [attempt] = await engine.storage.list_deliveries(request.id)
            assert attempt.status_code == 410


async def test_private_callback_refused_at_delivery(host: ImageHost) -> None:
    with ImageHost() as receiver:  # not on the allow-list: loopback is private
        receiver.add("/hook", status=200)
        async with Engine(_settings(host)) as engine:
            request = await engine.submit(
                _csv(host.url("/a.jpg")), callback_url=receiver.url("/hook")
            )

            async def tried() -> bool:
                return bool(await engine.storage.list_deliveries(request.id))

            await _run_until(engine, tried)
            [attempt] = await engine.storage.list_deliveries(request.id)
            assert attempt.status_code is None
            assert attempt.error is not None and attempt.error.startswith("blocked-address")
            assert receiver.requests == []


async def test_receiver_down_then_up(host: ImageHost) -> None:
    from servers import closed_port

    port = closed_port()
    url = f"http://127.0.0.1:{port}/hook"
    settings = _settings(host).evolve(
        fetch=FetchPolicy(allow=parse_allow(f"{host.allow},127.0.0.1:{port}"), retries=0)
    )
    async with Engine(settings) as engine:
        request = await engine.submit(_csv(host.url("/a.jpg")), callback_url=url)

        async def two_failures() -> bool:
            return len(await engine.storage.list_deliveries(request.id)) >= 2

        await _run_until(engine, two_failures)
        attempts = await engine.storage.list_deliveries(request.id)
        assert all(a.error and a.error.startswith("connect-error") for a in attempts)
        events = await claim_events(engine.storage, now=now() + 3600, limit=5, lease_seconds=1)
        assert [e.request_id for e in events] == [request.id]  # still in the outbox


async def test_engine_registers_webhooks_with_the_rules_and_no_server() -> None:
    """An application embedding the library gets the callback check, ids and secrets."""
    from csvimg import CallbackUrlError, Engine, NotFoundError, Settings
    from csvimg.fetch import FetchPolicy, parse_allow
    from csvimg.webhooks import is_webhook_id

    async with Engine(Settings()) as engine:
        for bad in ("http://127.0.0.1/hook", "ftp://hooks.example/x", "http://10.1.2.3/x"):
            with pytest.raises(CallbackUrlError, match="callback_url refused"):
                await engine.add_webhook(bad)
        assert await engine.webhooks() == []
    allowed = Settings(fetch=FetchPolicy(allow=parse_allow("127.0.0.1:9")))
    async with Engine(allowed) as engine:
        hook = await engine.add_webhook("  http://127.0.0.1:9/hook  ", owner="k1")
        assert is_webhook_id(hook.id)
        assert hook.secret.startswith("whsec_")
        assert hook.url == "http://127.0.0.1:9/hook"
        assert [h.id for h in await engine.webhooks(owner="k1")] == [hook.id]
        assert await engine.webhooks() == []  # another owner's are not listed
        with pytest.raises(NotFoundError):
            await engine.delete_webhook(hook.id)  # not the ownerless one's
        await engine.delete_webhook(hook.id, owner="k1")
        with pytest.raises(NotFoundError):
            await engine.delete_webhook("not-an-id", owner="k1")
