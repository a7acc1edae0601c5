"""Signed webhooks (``ghostrunner_http._webhooks``, ``._delivery``): signatures checked
by a verifier written from the Standard Webhooks specification and by the reference
library ``standardwebhooks``, the payload, event filters, the
outbox's cursor, the retry schedule on a fake clock, giving up, ``Retry-After``, 410,
redirects never followed, the answer's size and time bounded, a stop that hands back what
was being sent, two workers on one outbox, and secrets kept out of reprs, errors and logs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import standardwebhooks

from ghostrunner.testing import InMemoryStore
from ghostrunner.webhooks import DeliveryQuery, DeliveryStatus, NewDelivery, WebhookDelivery
from ghostrunner_http._delivery import MAX_ANSWER, Attempt, Dispatcher
from ghostrunner_http._webhooks import (
    DEFAULT_SCHEDULE,
    DeliveryPolicy,
    Webhook,
    event_source,
    new_msg_id,
    next_attempt,
    parse_retry_after,
    parse_secret,
    payload,
    sign,
)
from tests.webhookkit import (
    OTHER_SECRET,
    SECRET,
    T0,
    Ev,
    Invalid,
    ListSource,
    Receiver,
    receiving,
    verify,
    verify_with_reference,
)

KEY = parse_secret(SECRET)
S = timedelta(seconds=1)
FAST = DeliveryPolicy(schedule=(1, 10, 100), jitter=0.0, max_attempts=4, poll_interval=0.05)


def hook(url: str = "http://127.0.0.1:9/hook", **kw: Any) -> Webhook:
    return Webhook(**{"name": "ci", "url": url, "key": KEY, **kw})


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- signing


def test_signatures_verify_with_a_verifier_written_from_the_spec() -> None:
    body = payload(Ev(1, data={"exit_code": 0}))
    msg_id = new_msg_id(1)
    stamp = int(time.time())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
               "webhook-signature": sign(KEY, msg_id, stamp, body.encode())}
    assert verify(SECRET, headers, body.encode())["data"]["id"] == 1
    # several signatures (a key rotation): one matching is enough
    rotated = {**headers, "webhook-signature": "v1,bm9wZQ== " + headers["webhook-signature"]}
    assert verify(SECRET, rotated, body.encode())
    for bad, why in [
        ({**headers, "webhook-id": msg_id + "x"}, "no matching signature"),
        ({**headers, "webhook-timestamp": str(stamp + 1)}, "no matching signature"),
        ({**headers, "webhook-signature": "v2," + headers["webhook-signature"][3:]},
         "no matching signature"),
        ({k: v for k, v in headers.items() if k != "webhook-id"}, "missing header"),
    ]:
        with pytest.raises(Invalid, match=why):
            verify(SECRET, bad, body.encode())
    with pytest.raises(Invalid, match="no matching signature"):
        verify(SECRET, headers, body.encode() + b" ")
    with pytest.raises(Invalid, match="no matching signature"):
        verify(OTHER_SECRET, headers, body.encode())
    with pytest.raises(Invalid, match="tolerance"):
        verify(SECRET, headers, body.encode(), now=stamp + 301)


def test_signatures_verify_with_the_reference_library() -> None:
    body = payload(Ev(7, kind="task.created")).encode()
    stamp = int(time.time())
    headers = {"webhook-id": "msg_7_abc", "webhook-timestamp": str(stamp),
               "webhook-signature": sign(KEY, "msg_7_abc", stamp, body)}
    assert verify_with_reference(SECRET, headers, body)["type"] == "task.created"
    # and the library's own signature is ours
    ref = standardwebhooks.Webhook(SECRET)
    assert ref.sign("msg_7_abc", datetime.fromtimestamp(stamp).astimezone(), body) == \
        headers["webhook-signature"]
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(OTHER_SECRET).verify(body, headers)


def test_the_signature_is_the_specifications_hmac() -> None:
    # computed by hand from the spec: HMAC-SHA256(key, "{id}.{timestamp}.{body}")
    import hashlib
    import hmac

    body = b'{"type":"x"}'
    want = base64.b64encode(hmac.new(KEY, b"msg_1_a.1700000000." + body,
                                     hashlib.sha256).digest()).decode()
    assert sign(KEY, "msg_1_a", 1700000000, body) == "v1," + want


def test_payload_is_the_event_in_the_specs_envelope() -> None:
    at = datetime.fromisoformat("2024-05-01T12:00:00.123456+02:00")
    doc = json.loads(payload(Ev(42, kind="run.finished", task_id="t1", node_id=None, at=at,
                                data={"state": "succeeded", "when": at, "n": 3, "é": "ü"})))
    assert doc == {
        "type": "run.finished", "timestamp": "2024-05-01T10:00:00.123456Z",
        "data": {"id": 42, "kind": "run.finished", "at": "2024-05-01T10:00:00.123456Z",
                 "task_id": "t1", "node_id": None,
                 "data": {"state": "succeeded", "when": "2024-05-01T10:00:00.123456Z",
                          "n": 3, "é": "ü"}}}
    assert " " not in payload(Ev(1))  # compact: what is signed is what is sent


def test_message_ids_are_unique_and_name_their_event() -> None:
    ids = {new_msg_id(5) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("msg_5_") and "." not in i for i in ids)


def test_secrets_are_parsed_strictly_and_never_echoed() -> None:
    assert len(parse_secret(SECRET)) == 32
    assert parse_secret(SECRET.rstrip("=")) == parse_secret(SECRET)  # unpadded base64
    for bad in ("", "whsec_", "abc", SECRET[6:], "whsec_%%%%",
                "whsec_" + base64.b64encode(b"short").decode(),
                "whsec_" + base64.b64encode(bytes(65)).decode()):
        with pytest.raises(ValueError, match=r"secret|base64|bytes") as caught:
            parse_secret(bad)
        if len(bad) > 8:
            assert bad[6:] not in str(caught.value)
    h = hook()
    assert SECRET[6:] not in repr(h) and "key" not in repr(h)


def test_webhook_values_are_checked() -> None:
    for kw, message in [
        ({"url": "ftp://x/"}, "http"), ({"url": "http://u:p@x/"}, "user or password"),
        ({"url": "https:///path"}, "host"), ({"url": "http://x/#f"}, "fragment"),
        ({"name": "has space"}, "name"), ({"events": ()}, "events"),
        ({"events": ("run.[ab]",)}, "events"), ({"timeout": 0}, "timeout"),
        ({"concurrency": 0}, "concurrency"),
    ]:
        with pytest.raises(ValueError, match=message):
            hook(**kw)
    h = hook(events=("run.*", "task.created"))
    assert h.wants("run.finished") and h.wants("run.claimed") and h.wants("task.created")
    assert not h.wants("task.deleted") and not h.wants("runs.x")
    assert hook().wants("anything.at.all")
    assert repr(hook("https://hooks.example.com/secret-path?token=abc")).count("secret") == 0


# --------------------------------------------------------------------------- schedule


def test_the_default_schedule_is_the_specifications() -> None:
    assert DEFAULT_SCHEDULE == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    policy = DeliveryPolicy()
    assert policy.max_attempts == 10
    total = sum(DEFAULT_SCHEDULE)
    assert total / 3600 == pytest.approx(75.58, abs=0.01)  # 3 days 3.6 hours
    assert policy.max_age > total * (1 + policy.jitter)  # attempts run out first


def _delivery(attempts: int, started: datetime = T0) -> WebhookDelivery:
    return WebhookDelivery(id=1, webhook="ci", event_id=1, kind="k", msg_id="m", body="{}",
                           status="pending", attempts=attempts, created_at=started,
                           started_at=started)


def test_next_attempt_follows_the_schedule_with_bounded_jitter() -> None:
    policy = DeliveryPolicy(schedule=(5, 300, 1800), jitter=0.1, max_attempts=6)
    rng = random.Random(1)
    for attempts, base in [(1, 5), (2, 300), (3, 1800), (4, 1800), (5, 1800)]:
        delays = [(next_attempt(policy, _delivery(attempts), T0, rng) - T0).total_seconds()
                  for _ in range(200)]
        assert min(delays) >= base * 0.9 and max(delays) <= base * 1.1
        assert max(delays) - min(delays) > base * 0.1  # jittered, not fixed
    assert next_attempt(policy, _delivery(6), T0, rng) is None  # attempts used up
    old = DeliveryPolicy(schedule=(60,), jitter=0, max_attempts=100, max_age=100)
    assert next_attempt(old, _delivery(1), T0 + 30 * S, rng) == T0 + 90 * S
    assert next_attempt(old, _delivery(1), T0 + 50 * S, rng) is None  # past the max age
    # a Retry-After longer than the schedule wins, within the max age
    assert next_attempt(old, _delivery(1), T0, rng, retry_after=90) == T0 + 90 * S
    assert next_attempt(old, _delivery(1), T0, rng, retry_after=120) is None
    assert next_attempt(FAST, _delivery(1), T0, rng, retry_after=7) == T0 + 7 * S


def test_retry_after_headers() -> None:
    assert parse_retry_after("120", T0) == 120
    assert parse_retry_after("99999999", T0) == 86400
    assert parse_retry_after("Wed, 01 May 2024 12:01:00 GMT", T0) == 60
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", T0) == 0
    for bad in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(bad, T0) is None


# --------------------------------------------------------------------------- the worker


def _mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False)


def _deliveries(store: InMemoryStore) -> dict[int, WebhookDelivery]:
    return {d.event_id: d for d in store.deliveries.values()}


def test_events_reach_a_real_receiver_signed_filtered_once(tmp_path: Any) -> None:
    store = InMemoryStore()
    source = ListSource([Ev(1, "task.created")])

    async def main(receiver: Receiver) -> None:
        hooks = [hook(receiver.url, name="runs", events=("run.*",)),
                 hook(receiver.url, name="all")]
        d = Dispatcher(store, hooks, FAST, source=source)
        try:
            await d.pass_once()  # first sight: both start after event 1
            assert await store.webhook_cursors() == {"runs": 1, "all": 1}
            source.add(Ev(2, "run.claimed"), Ev(3, "task.created"), Ev(4, "run.finished"))
            await d.pass_once()
            await d.wait_idle()
        finally:
            await d.stop()

    with receiving(Receiver()) as receiver:
        run(main(receiver))
    assert all(r.valid for r in receiver.got), [r.problem for r in receiver.got]
    got = sorted((r.body["data"]["id"], r.msg_id) for r in receiver.got if r.body)
    assert [e for e, _ in got] == [2, 2, 3, 4, 4]
    assert len({m for _, m in got}) == 5  # one message id per delivery
    assert all(d.status is DeliveryStatus.DELIVERED for d in store.deliveries.values())
    assert {(d.webhook, d.event_id) for d in store.deliveries.values()} == {
        ("runs", 2), ("runs", 4), ("all", 2), ("all", 3), ("all", 4)}
    assert {r.body["type"] for r in receiver.got if r.body} == {"run.claimed",
                                                                "task.created",
                                                                "run.finished"}


def test_a_batch_of_events_larger_than_the_read_size(tmp_path: Any) -> None:
    store = InMemoryStore()
    source = ListSource()
    policy = DeliveryPolicy(batch=7, poll_interval=0.05)
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["data"]["id"])
        return httpx.Response(204)

    async def main() -> None:
        d = Dispatcher(store, [hook(concurrency=50)], policy, source=source,
                       client=_mock(handler))
        await d.take()
        source.add(*(Ev(i) for i in range(1, 31)))
        assert await d.take() == 30
        assert source.reads >= 5
        while await d.send_due():
            await d.wait_idle()

    run(main())
    assert sorted(seen) == list(range(1, 31))
    assert store.cursors == {"ci": 30}


def test_retries_follow_the_schedule_on_a_fake_clock_then_give_up() -> None:
    clock = Clock()
    store = InMemoryStore()
    source = ListSource()
    calls: list[tuple[datetime, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((clock(), request.headers["webhook-id"]))
        return httpx.Response(503, text="busy")

    async def main() -> None:
        d = Dispatcher(store, [hook()], FAST, source=source, clock=clock,
                       client=_mock(handler))
        await d.take()
        source.add(Ev(1))
        await d.take()
        await d.send_due()
        await d.wait_idle()
        while (due := _deliveries(store)[1].next_attempt_at) is not None:
            clock.now = due - timedelta(milliseconds=1)
            assert await d.send_due() == 0  # not before its time
            clock.now = due
            assert await d.send_due() == 1
            await d.wait_idle()

    run(main())
    # attempts at 0, 1 (+1), 11 (+10), 111 (+100): then max_attempts (4) is reached
    assert [(t - T0).total_seconds() for t, _ in calls] == [0, 1, 11, 111]
    assert len({m for _, m in calls}) == 1  # the same message id every time
    d = _deliveries(store)[1]
    assert (d.status, d.attempts, d.last_status, d.next_attempt_at) == (
        DeliveryStatus.FAILED, 4, 503, None)
    assert d.last_error == "HTTP 503: busy"
    assert d.finished_at == T0 + 111 * S


def test_a_delivery_that_succeeds_on_a_retry_is_delivered() -> None:
    clock = Clock()
    store = InMemoryStore()
    answers = [500, 429, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        return httpx.Response(status, headers={"retry-after": "30"} if status == 429 else {})

    async def main() -> None:
        source = ListSource()
        d = Dispatcher(store, [hook()], FAST, source=source, clock=clock,
                       client=_mock(handler))
        await d.take()
        source.add(Ev(1))
        await d.take()
        await d.send_due()
        await d.wait_idle()
        assert _deliveries(store)[1].next_attempt_at == T0 + 1 * S
        clock.advance(1)
        await d.send_due()
        await d.wait_idle()
        # 429 with Retry-After: 30 waits 30 s, not the schedule's 10
        assert _deliveries(store)[1].next_attempt_at == T0 + 31 * S
        clock.advance(29)
        assert await d.send_due() == 0  # not due yet
        clock.advance(1)
        await d.send_due()
        await d.wait_idle()

    run(main())
    d = _deliveries(store)[1]
    assert (d.status, d.attempts, d.finished_at) == (DeliveryStatus.DELIVERED, 3, T0 + 31 * S)
    assert answers == []


def test_410_gone_gives_up_at_once() -> None:
    store = InMemoryStore()
    source = ListSource()

    async def main() -> None:
        d = Dispatcher(store, [hook()], FAST, source=source,
                       client=_mock(lambda r: httpx.Response(410)))
        await d.take()
        source.add(Ev(1))
        await d.pass_once()
        await d.wait_idle()

    run(main())
    d = _deliveries(store)[1]
    assert (d.status, d.attempts, d.last_status) == (DeliveryStatus.FAILED, 1, 410)


def test_redirects_are_never_followed() -> None:
    with receiving(Receiver()) as target, receiving(
            Receiver(status=307, headers={"location": "http://127.0.0.1:1/x"})) as first:
        first.headers["location"] = target.url
        store = InMemoryStore()
        source = ListSource()

        async def main() -> None:
            d = Dispatcher(store, [hook(first.url)], FAST, source=source)
            await d.take()
            source.add(Ev(1))
            await d.pass_once()
            await d.wait_idle()
            await d.stop()

        run(main())
    assert len(first.got) == 1 and target.got == []
    d = _deliveries(store)[1]
    assert d.status is DeliveryStatus.PENDING and d.last_status == 307
    assert d.last_error is not None and "redirects are not followed" in d.last_error


def test_the_answer_read_is_bounded() -> None:
    pulled = 0

    async def endless() -> Any:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 1024

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, content=endless())

    async def main() -> Attempt:
        d = Dispatcher(InMemoryStore(), [hook()], FAST, source=None, client=_mock(handler))
        delivery = _delivery(1)
        return await d.attempt(hook(), delivery)

    result = run(main())
    assert result.status == 500 and result.error == "HTTP 500: " + "x" * 200
    assert pulled * 1024 <= MAX_ANSWER + 1024


def test_an_attempt_gives_up_after_its_timeout() -> None:
    with receiving(Receiver(hang=True)) as receiver:
        async def main() -> Attempt:
            d = Dispatcher(InMemoryStore(), [], FAST, source=None)
            try:
                return await d.attempt(hook(receiver.url, timeout=0.5), _delivery(1))
            finally:
                await d.stop()

        started = time.monotonic()
        result = run(main())
        took = time.monotonic() - started
    assert result.status is None and result.error is not None
    assert "0.5 s" in result.error
    assert 0.4 < took < 5


def test_connection_errors_keep_the_url_out() -> None:
    async def main() -> Attempt:
        d = Dispatcher(InMemoryStore(), [], FAST, source=None)
        try:
            return await d.attempt(hook("http://127.0.0.1:1/secret-path-xyz?k=v"),
                                   _delivery(1))
        finally:
            await d.stop()

    result = run(main())
    assert result.status is None and result.error
    assert "secret-path-xyz" not in result.error


def test_a_stop_hands_back_what_was_being_sent() -> None:
    store = InMemoryStore()
    source = ListSource()
    with receiving(Receiver(hang=True)) as receiver:
        async def main() -> float:
            d = Dispatcher(store, [hook(receiver.url, timeout=60)], FAST, source=source)
            await d.take()
            source.add(Ev(1), Ev(2))
            await d.pass_once()
            assert await asyncio.to_thread(receiver.wait_for, 2)
            started = time.monotonic()
            await d.stop()
            return time.monotonic() - started

        took = run(main())
    assert took < 2
    for d in _deliveries(store).values():
        assert d.status is DeliveryStatus.PENDING and d.lease_until is None
        assert d.attempts == 1 and d.last_error == "interrupted: the server stopped"
        assert d.next_attempt_at is not None


def test_concurrency_is_bounded_per_webhook_and_overall() -> None:
    store = InMemoryStore()
    source = ListSource([Ev(i) for i in range(1, 21)])
    most = {"a": 0, "b": 0, "all": 0}
    now = {"a": 0, "b": 0, "all": 0}

    answered = 0
    everything = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        name = request.url.host.split(".")[0]
        for k in (name, "all"):
            now[k] += 1
            most[k] = max(most[k], now[k])
        await asyncio.sleep(0.02)  # held a while, so that others start meanwhile
        for k in (name, "all"):
            now[k] -= 1
        answered += 1
        if answered == 40:
            everything.set()
        return httpx.Response(200)

    async def main() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        policy = DeliveryPolicy(concurrency=5, poll_interval=0.05)
        hooks = [hook("http://a.test/", name="a", concurrency=2),
                 hook("http://b.test/", name="b", concurrency=10)]
        d = Dispatcher(store, hooks, policy, source=source, client=client)
        for name in ("a", "b"):
            await store.webhook_cursor(name, 0)
        task = asyncio.create_task(d.run())
        async with asyncio.timeout(30):
            await everything.wait()
        await d.wait_idle()
        task.cancel()
        await d.stop()
        assert sum(x.status is DeliveryStatus.DELIVERED for x in store.deliveries.values()) == 40

    run(main())
    assert most["all"] == 5 and most["a"] == 2 and 3 <= most["b"] <= 5


def test_two_workers_on_one_outbox_take_each_event_once() -> None:
    store = InMemoryStore()
    source = ListSource()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["webhook-id"])
        return httpx.Response(200)

    async def main() -> None:
        one = Dispatcher(store, [hook()], FAST, source=source, client=_mock(handler))
        two = Dispatcher(store, [hook()], FAST, source=source, client=_mock(handler))
        await one.take()
        await two.take()
        source.add(*(Ev(i) for i in range(1, 11)))
        await one.take()
        await two.take()  # its cursor moved under it: it catches up, adds nothing
        source.add(Ev(11))
        assert await two.take() == 1
        assert await one.take() == 0
        for d in (one, two, one, two):
            await d.send_due()
            await d.wait_idle()

    run(main())
    assert len(seen) == len(set(seen)) == 11
    assert sorted(d.event_id for d in store.deliveries.values()) == list(range(1, 12))


def test_a_crash_between_reading_and_taking_loses_nothing() -> None:
    store = InMemoryStore()
    source = ListSource()

    class Crash(Exception):
        pass

    async def main() -> None:
        d = Dispatcher(store, [hook()], FAST, source=source, client=_mock(
            lambda r: httpx.Response(200)))
        await d.take()
        source.add(Ev(1), Ev(2))
        real = store.enqueue_deliveries

        async def crashing(*args: Any, **kw: Any) -> bool:
            raise Crash

        store.enqueue_deliveries = crashing  # type: ignore[method-assign]
        with pytest.raises(Crash):
            await d.take()
        store.enqueue_deliveries = real  # type: ignore[method-assign]
        # a new process (a new dispatcher): the cursor did not move, both are taken
        again = Dispatcher(store, [hook()], FAST, source=source, client=_mock(
            lambda r: httpx.Response(200)))
        assert await again.take() == 2

    run(main())
    assert sorted(_deliveries(store)) == [1, 2]


def test_without_an_event_log_the_outbox_is_still_sent() -> None:
    assert event_source(object()) is None  # a custom store without an event log
    assert event_source(InMemoryStore()) is not None
    assert event_source(ListSource()) is not None
    store = InMemoryStore()
    sent: list[str] = []

    async def main() -> None:
        # an outbox filled earlier (say, before a restart)
        await store.webhook_cursor("ci", 0)
        filler = Dispatcher(store, [hook()], FAST, source=ListSource([Ev(1)]),
                            client=_mock(lambda r: httpx.Response(500)))
        await filler.take()
        d = Dispatcher(store, [hook()], FAST, source=None, client=_mock(
            lambda r: (sent.append(r.headers["webhook-id"]), httpx.Response(200))[1]))
        assert await d.take() == 0
        await d.send_due()
        await d.wait_idle()

    run(main())
    assert len(sent) == 1 and _deliveries(store)[1].status is DeliveryStatus.DELIVERED


def test_failures_are_logged_once_per_streak_without_secrets(
        caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()
    source = ListSource()
    answers = [500] * 5 + [200] * 5
    url = "https://hooks.example.com/path-secret-123"

    async def main() -> None:
        clock = Clock()
        d = Dispatcher(store, [hook(url, concurrency=1)], FAST, source=source, clock=clock,
                       client=_mock(lambda r: httpx.Response(answers.pop(0))))
        await d.take()
        source.add(*(Ev(i) for i in range(1, 6)))
        await d.take()
        for _ in range(12):
            await d.send_due()
            await d.wait_idle()
            clock.advance(1)

    with caplog.at_level(logging.DEBUG, logger="ghostrunner.webhooks"):
        run(main())
    text = caplog.text
    assert text.count("attempt failed") == 1 and text.count("delivering again") == 1
    assert "path-secret-123" not in text and SECRET[6:] not in text
    assert all(d.status is DeliveryStatus.DELIVERED for d in store.deliveries.values())


def test_prune_keeps_what_retention_says() -> None:
    clock = Clock()
    store = InMemoryStore()
    policy = DeliveryPolicy(retention_days=7, failed_retention_days=30)

    async def main() -> int:
        await store.webhook_cursor("ci", 0)
        d = Dispatcher(store, [hook()], policy, source=ListSource([Ev(1), Ev(2)]),
                       clock=clock, client=_mock(lambda r: httpx.Response(200)))
        await d.take()
        await d.send_due()
        await d.wait_idle()
        clock.advance(6 * 86400)
        assert await d.prune() == 0
        clock.advance(86400 + 1)
        return await d.prune()

    assert run(main()) == 2
    assert store.deliveries == {}


def test_every_delivery_field_is_rendered() -> None:
    store = InMemoryStore()

    async def main() -> WebhookDelivery:
        await store.webhook_cursor("ci", 0)
        d = Dispatcher(store, [hook()], FAST, source=ListSource([Ev(1)]),
                       client=_mock(lambda r: httpx.Response(500)))
        await d.pass_once()
        await d.wait_idle()
        page = await store.query_deliveries(DeliveryQuery())
        return page.items[0]

    from ghostrunner_http._webhooks import render_delivery
    row = render_delivery(run(main()), T0)
    assert row["status"] == "pending" and row["last_status"] == 500
    assert set(row) >= {"id", "msg_id", "event_id", "kind", "attempts", "next_attempt_at"}


# --------------------------------------------------------------------------- configuration


def _config(tmp_path: Any, text: str, env: dict[str, str] | None = None) -> Any:
    from ghostrunner_http.config import load_settings

    path = tmp_path / "ghostrunner.toml"
    path.write_text('executor = "fake"\n' + text, encoding="utf-8")
    return load_settings(path, env or {})


def test_webhooks_from_the_config_file(tmp_path: Any) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n", encoding="utf-8")
    s = _config(tmp_path, f"""
[webhook_delivery]
retry_schedule = [1, 2.5, 60]
max_attempts = 5
max_age = 3600
concurrency = 3
retention_days = 2
failed_retention_days = 10
poll_interval = 0.5
jitter = 0

[[webhooks]]
url = "https://hooks.example.com/ghostrunner"
secret_file = "{tmp_path / 'secret'}"
events = ["run.*", "task.created"]
timeout = 20
concurrency = 2

[[webhooks]]
name = "ops"
url = "http://10.0.0.5:8000/in"
secret_env = "OPS_HOOK_SECRET"

[[webhooks]]
url = "http://[::1]:9000/x"
secret = "{OTHER_SECRET}"
""", {"OPS_HOOK_SECRET": OTHER_SECRET})
    one, two, three = s.webhooks
    assert (one.name, one.url, one.events, one.timeout, one.concurrency, one.key) == (
        "hooks.example.com", "https://hooks.example.com/ghostrunner",
        ("run.*", "task.created"), 20.0, 2, KEY)
    assert (two.name, two.events, two.timeout, two.key) == (
        "ops", ("*",), 15.0, parse_secret(OTHER_SECRET))
    assert three.name == "1:9000"  # ::1, in a name's characters
    p = s.webhook_policy
    assert (p.schedule, p.max_attempts, p.max_age, p.concurrency, p.retention_days,
            p.failed_retention_days, p.poll_interval, p.jitter) == (
        (1.0, 2.5, 60.0), 5, 3600.0, 3, 2.0, 10.0, 0.5, 0.0)
    # secrets: never in the repr; in the list the log redacts
    text = repr(s)
    for secret in (SECRET, OTHER_SECRET):
        assert secret[6:] not in text and secret[6:].rstrip("=") not in text
        assert secret[6:] in s.secrets
    assert "/ghostrunner" not in text  # only the URL's origin


def test_the_policy_from_the_environment(tmp_path: Any) -> None:
    s = _config(tmp_path, "", {"GHOSTRUNNER_WEBHOOK_DELIVERY_RETRY_SCHEDULE": "5, 60,600",
                               "GHOSTRUNNER_WEBHOOK_DELIVERY_MAX_ATTEMPTS": "3"})
    assert s.webhook_policy.schedule == (5.0, 60.0, 600.0)
    assert s.webhook_policy.max_attempts == 3
    assert s.webhooks == ()
    assert _config(tmp_path, "").webhook_policy == DeliveryPolicy()


@pytest.mark.parametrize(("text", "key"), [
    ('[[webhooks]]\nsecret = "{s}"\n', "webhooks[0].url"),
    ('[[webhooks]]\nurl = "ftp://x/"\nsecret = "{s}"\n', "webhooks[0].url"),
    ('[[webhooks]]\nurl = "https://u:pw@x/"\nsecret = "{s}"\n', "webhooks[0].url"),
    ('[[webhooks]]\nurl = "https://x/"\n', "webhooks[0].secret"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "{s}"\nsecret_env = "A"\n',
     "webhooks[0].secret"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "nope"\n', "webhooks[0].secret"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "whsec_AAAA"\n', "webhooks[0].secret"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret_env = "MISSING"\n', "webhooks[0].secret_env"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret_file = "/nonexistent/s"\n',
     "webhooks[0].secret_file"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "{s}"\nevents = []\n', "webhooks[0].events"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "{s}"\nevents = ["a b"]\n',
     "webhooks[0].events"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "{s}"\ntimeout = 0\n', "webhooks[0].timeout"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "{s}"\nname = "a b"\n', "webhooks[0].name"),
    ('[[webhooks]]\nurl = "https://x/"\nsecret = "{s}"\nsecrets = 1\n',
     "webhooks[0].secrets"),
    ('[[webhooks]]\nurl = "https://x/a"\nsecret = "{s}"\n'
     '[[webhooks]]\nurl = "https://x/b"\nsecret = "{s}"\n', "webhooks[1].name"),
    ('webhooks = "https://x/"\n', "webhooks"),
    ('[webhook_delivery]\nretry_schedule = []\n', "webhook_delivery.retry_schedule"),
    ('[webhook_delivery]\nretry_schedule = [-1]\n', "webhook_delivery.retry_schedule[0]"),
    ('[webhook_delivery]\nmax_attempts = 0\n', "webhook_delivery.max_attempts"),
    ('[webhook_delivery]\nconcurrency = 0\n', "webhook_delivery.concurrency"),
    ('[webhook_delivery]\nretention_days = 0\n', "webhook_delivery.retention_days"),
    ('[webhook_delivery]\nfailed_retention_days = 0\n',
     "webhook_delivery.failed_retention_days"),
    ('[webhook_delivery]\nbogus = 1\n', "webhook_delivery.bogus"),
])
def test_config_errors_name_the_key_and_never_the_secret(tmp_path: Any, text: str,
                                                         key: str) -> None:
    from ghostrunner_http.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, text.replace("{s}", SECRET))
    assert caught.value.key == key, str(caught.value)
    assert SECRET[6:] not in str(caught.value)


def test_a_bad_secret_in_a_file_is_not_echoed(tmp_path: Any) -> None:
    from ghostrunner_http.config import ConfigError

    leaked = "whsec_" + base64.b64encode(b"too short but secret").decode()
    (tmp_path / "s").write_text(leaked, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, f'[[webhooks]]\nurl = "https://x/"\nsecret_file = "{tmp_path}/s"\n')
    assert caught.value.key == "webhooks[0].secret_file"
    assert leaked[6:] not in str(caught.value)


# --------------------------------------------------------------------------- PostgreSQL


def test_two_runners_on_one_postgresql_send_each_event_once(postgres: Any) -> None:
    """Two processes' workers (two stores: two pools) on one database, the same webhook
    and event log: each event is taken once and sent once (no crash: no duplicate)."""
    from ghostrunner.postgres import PostgresStore

    dsn = postgres.database()
    source = ListSource()
    n = 60
    with receiving(Receiver(delay=0.01)) as receiver:
        async def main() -> None:
            stores = [PostgresStore(dsn, max_size=4), PostgresStore(dsn, max_size=4)]
            for s in stores:
                await s.open()
            policy = DeliveryPolicy(poll_interval=0.02, batch=10)
            workers = [Dispatcher(s, [hook(receiver.url, concurrency=3)], policy,
                                  source=source) for s in stores]
            for w in workers:
                await w.take()  # the webhook's cursor: 0
            source.add(*(Ev(i) for i in range(1, n + 1)))
            tasks = [asyncio.create_task(w.run()) for w in workers]
            try:
                assert await asyncio.to_thread(receiver.wait_for, n)
                for w in workers:
                    await w.wait_idle()  # the last answers recorded
                counts = await stores[1].delivery_counts()
                assert counts == {"ci": {DeliveryStatus.DELIVERED: n}}
            finally:
                for t in tasks:
                    t.cancel()
                for w, s in zip(workers, stores, strict=True):
                    await w.stop()
                    await s.close()

        run(main())
    postgres.drop(dsn)
    ids = [r.body["data"]["id"] for r in receiver.got if r.body]
    assert sorted(ids) == list(range(1, n + 1))  # each exactly once
    assert all(r.valid for r in receiver.got)


def test_the_receiver_snippet_of_the_docs_verifies_what_is_sent() -> None:
    """docs/operations.md's standard-library verifier, run as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", doc, re.S)
                   if "def verify(" in block)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "operations.md", "exec"), namespace)
    body = payload(Ev(3, data={"exit_code": 1})).encode()
    stamp = int(time.time())
    headers = {"Webhook-Id": "msg_3_x", "Webhook-Timestamp": str(stamp),
               "Webhook-Signature": sign(KEY, "msg_3_x", stamp, body)}
    assert namespace["verify"](SECRET, headers, body)["data"]["id"] == 3
    with pytest.raises(ValueError, match="no valid signature"):
        namespace["verify"](OTHER_SECRET, headers, body)
    with pytest.raises(ValueError, match="timestamp"):
        namespace["verify"](SECRET, {**headers, "Webhook-Timestamp": str(stamp - 301)}, body)


def test_an_event_json_cannot_hold_still_gets_a_body() -> None:
    doc = json.loads(payload(Ev(1, data={"ratio": float("nan"), "ok": [1, float("inf")]})))
    assert doc["data"]["data"] == {"ratio": None, "ok": [1, None]}
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    doc = json.loads(payload(Ev(2, data=cyclic)))
    assert doc["data"]["id"] == 2 and "error" in doc["data"]["data"]


def test_the_worker_survives_a_failing_event_source(caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()

    class Flaky(ListSource):
        fail = 2

        async def events_after(self, after_id: int, limit: int) -> Any:
            if self.fail:
                self.fail -= 1
                raise RuntimeError("the event log broke")
            return await super().events_after(after_id, limit)

    source = Flaky([Ev(1)])
    sent = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.set()
        return httpx.Response(200)

    async def main() -> None:
        await store.webhook_cursor("ci", 0)
        d = Dispatcher(store, [hook()], FAST, source=source,
                       client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
        task = asyncio.create_task(d.run())
        async with asyncio.timeout(10):
            await sent.wait()
        await d.wait_idle()
        task.cancel()
        await d.stop()

    with caplog.at_level(logging.WARNING, logger="ghostrunner.webhooks"):
        run(main())
    assert caplog.text.count("a pass failed") == 1  # once per streak
    assert _deliveries(store)[1].status is DeliveryStatus.DELIVERED


def test_pending_deliveries_of_a_webhook_no_longer_configured_are_named(
        caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()

    async def main() -> None:
        await store.webhook_cursor("gone", 0)
        await store.enqueue_deliveries("gone", 0, 1, [
            NewDelivery(event_id=1, kind="k", msg_id="msg_1_a", body="{}")], T0)
        d = Dispatcher(store, [hook()], FAST, source=None)
        await d.warn_unconfigured()
        await d.stop()

    with caplog.at_level(logging.WARNING, logger="ghostrunner.webhooks"):
        run(main())
    assert "webhook 'gone' is not configured: its 1 pending deliveries are kept" in caplog.text
