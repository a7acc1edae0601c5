"""The ``WebhookStore`` contract (``ghostrunner_http._webhooks``), on every store: the
cursor and its compare-and-set, one delivery per (webhook, event), claims and leases,
recording attempts, operator retries, the listing's filters and pages, pruning.

On PostgreSQL also: two stores (two processes' pools) on one database racing to take the
same events and to claim the same deliveries.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ghostrunner.errors import IllegalTransition, NotFound, ValidationError
from ghostrunner.postgres import PostgresStore
from ghostrunner.webhooks import DeliveryQuery, DeliveryStatus, NewDelivery
from ghostrunner_http._webhooks import WebhookStore
from tests.pg import PgServer

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
PENDING, DELIVERED, FAILED = (DeliveryStatus.PENDING, DeliveryStatus.DELIVERED,
                              DeliveryStatus.FAILED)


def new(event_id: int, kind: str = "run.finished", tag: str = "x") -> NewDelivery:
    return NewDelivery(event_id=event_id, kind=kind, msg_id=f"msg_{event_id}_{tag}",
                       body=f'{{"type":"{kind}","n":{event_id}}}')


async def fill(store: Any, webhook: str, events: range, now: datetime = T0) -> None:
    cursor = await store.webhook_cursor(webhook, 0)
    assert await store.enqueue_deliveries(
        webhook, cursor, events[-1], [new(i, tag=webhook) for i in events], now)


async def test_every_store_keeps_a_webhook_outbox(store: Any) -> None:
    assert isinstance(store, WebhookStore)


async def test_a_new_webhook_starts_where_it_is_told_and_keeps_its_cursor(store: Any) -> None:
    assert await store.webhook_cursor("a", 41) == 41
    assert await store.webhook_cursor("a", 0) == 41  # known: start ignored
    assert await store.webhook_cursors() == {"a": 41}


async def test_enqueue_moves_the_cursor_only_from_where_it_was(store: Any) -> None:
    await store.webhook_cursor("a", 0)
    assert await store.enqueue_deliveries("a", 0, 5, [new(2), new(5)], T0)
    # a second taker with the old cursor changes nothing
    assert not await store.enqueue_deliveries("a", 0, 7, [new(6)], T0)
    assert await store.webhook_cursors() == {"a": 5}
    page = await store.query_deliveries(DeliveryQuery())
    assert [(d.event_id, d.status) for d in page.items] == [(5, PENDING), (2, PENDING)]
    d = page.items[0]
    assert (d.webhook, d.kind, d.msg_id, d.body, d.attempts) == (
        "a", "run.finished", "msg_5_x", '{"type":"run.finished","n":5}', 0)
    assert d.created_at == d.started_at == d.next_attempt_at == T0
    assert d.lease_until is d.last_attempt_at is d.finished_at is None
    # an unknown webhook has no cursor to move
    assert not await store.enqueue_deliveries("nobody", 0, 1, [new(1)], T0)


async def test_one_delivery_per_webhook_and_event(store: Any) -> None:
    await fill(store, "a", range(1, 4))
    cursor = (await store.webhook_cursors())["a"]
    # the same events again (a crash between sending and... never: but at-least-once)
    assert await store.enqueue_deliveries("a", cursor, 4, [new(3), new(4)], T0)
    await fill(store, "b", range(1, 2))
    counts = await store.delivery_counts()
    assert counts == {"a": {PENDING: 4}, "b": {PENDING: 1}}
    events = [d.event_id for d in (await store.query_deliveries(
        DeliveryQuery(webhook="a"))).items]
    assert sorted(events) == [1, 2, 3, 4]


async def test_an_empty_batch_still_moves_the_cursor(store: Any) -> None:
    await store.webhook_cursor("a", 0)
    assert await store.enqueue_deliveries("a", 0, 10, [], T0)  # no event wanted
    assert await store.webhook_cursors() == {"a": 10}
    assert (await store.query_deliveries(DeliveryQuery())).items == []


async def test_claims_take_due_deliveries_of_one_webhook_once(store: Any) -> None:
    await fill(store, "a", range(1, 6))
    await fill(store, "b", range(1, 3))
    got = await store.claim_deliveries("a", T0, T0 + 60 * S, 3)
    assert [d.event_id for d in got] == [1, 2, 3]
    assert all(d.attempts == 1 and d.lease_until == T0 + 60 * S and d.last_attempt_at == T0
               for d in got)
    assert got[0].sending(T0) and not got[0].sending(T0 + 60 * S)
    # leased: not claimed again while the lease runs
    assert [d.event_id for d in await store.claim_deliveries("a", T0 + S, T0 + 61 * S, 10)
            ] == [4, 5]
    assert await store.claim_deliveries("a", T0 + 2 * S, T0 + 62 * S, 10) == []
    assert await store.claim_deliveries("a", T0, T0 + S, 0) == []
    # the lease ran out (the process died while sending): claimed again
    again = await store.claim_deliveries("a", T0 + 60 * S, T0 + 120 * S, 10)
    assert [(d.event_id, d.attempts) for d in again] == [(1, 2), (2, 2), (3, 2)]
    # another webhook's deliveries are its own
    assert [d.event_id for d in await store.claim_deliveries("b", T0, T0 + S, 10)] == [1, 2]


async def test_not_due_until_the_next_attempt_time(store: Any) -> None:
    await fill(store, "a", range(1, 3))
    first = (await store.claim_deliveries("a", T0, T0 + 60 * S, 1))[0]
    assert await store.finish_delivery(first.id, 1, T0 + S, status=PENDING,
                                       next_attempt_at=T0 + 30 * S, http_status=503,
                                       error="HTTP 503")
    # earliest due first: event 2 (due at T0) before event 1 (due at T0 + 30 s)
    assert [d.event_id for d in await store.claim_deliveries("a", T0 + 29 * S, T0 + 90 * S,
                                                             10)] == [2]
    got = await store.claim_deliveries("a", T0 + 30 * S, T0 + 90 * S, 10)
    assert [(d.event_id, d.attempts, d.last_status, d.last_error) for d in got] == [
        (1, 2, 503, "HTTP 503")]


async def test_finishing_an_attempt(store: Any) -> None:
    await fill(store, "a", range(1, 4))
    one, two, three = await store.claim_deliveries("a", T0, T0 + 60 * S, 3)
    assert await store.finish_delivery(one.id, 1, T0 + S, status=DELIVERED,
                                       next_attempt_at=None, http_status=None, error=None)
    assert await store.finish_delivery(two.id, 1, T0 + S, status=FAILED,
                                       next_attempt_at=None, http_status=410,
                                       error="HTTP 410 Gone")
    # once finished, nothing more is recorded
    assert not await store.finish_delivery(one.id, 1, T0 + 2 * S, status=FAILED,
                                           next_attempt_at=None, http_status=500, error="x")
    # a stale attempt (its lease ran out, another claim took it) is not recorded...
    again = await store.claim_deliveries("a", T0 + 60 * S, T0 + 120 * S, 3)
    assert [(d.id, d.attempts) for d in again] == [(three.id, 2)]
    assert not await store.finish_delivery(three.id, 1, T0 + 61 * S, status=PENDING,
                                           next_attempt_at=T0 + 99 * S, http_status=500,
                                           error="late failure")
    # ...unless it delivered: that is true whoever sent it
    assert await store.finish_delivery(three.id, 1, T0 + 62 * S, status=DELIVERED,
                                       next_attempt_at=None, http_status=200, error=None)
    page = {d.event_id: d for d in (await store.query_deliveries(DeliveryQuery())).items}
    assert (page[1].status, page[1].finished_at, page[1].next_attempt_at,
            page[1].lease_until) == (DELIVERED, T0 + S, None, None)
    assert (page[2].status, page[2].last_status, page[2].last_error) == (
        FAILED, 410, "HTTP 410 Gone")
    assert (page[3].status, page[3].attempts, page[3].finished_at) == (
        DELIVERED, 2, T0 + 62 * S)
    with pytest.raises(ValidationError):
        await store.finish_delivery(one.id, 1, T0, status=PENDING, next_attempt_at=None,
                                    http_status=None, error=None)


async def test_errors_are_clipped_to_storable_text(store: Any) -> None:
    await fill(store, "a", range(1, 2))
    d = (await store.claim_deliveries("a", T0, T0 + S, 1))[0]
    assert await store.finish_delivery(d.id, 1, T0, status=PENDING,
                                       next_attempt_at=T0 + S, http_status=None,
                                       error="bad\x00\ud800\nline" + "x" * 5000)
    got = (await store.query_deliveries(DeliveryQuery())).items[0]
    assert got.last_error is not None and len(got.last_error) == 500
    assert got.last_error.startswith("bad") and "\x00" not in got.last_error
    assert "\n" not in got.last_error


async def test_an_operator_retries_a_failed_delivery_with_a_new_schedule(store: Any) -> None:
    await fill(store, "a", range(1, 3))
    one, two = await store.claim_deliveries("a", T0, T0 + S, 2)
    await store.finish_delivery(one.id, 1, T0, status=FAILED, next_attempt_at=None,
                                http_status=500, error="HTTP 500")
    later = T0 + timedelta(days=2)
    retried = await store.retry_delivery(one.id, later)
    assert (retried.status, retried.attempts, retried.started_at, retried.next_attempt_at,
            retried.finished_at, retried.msg_id, retried.created_at) == (
        PENDING, 0, later, later, None, one.msg_id, T0)
    # earliest due first: two (due since T0, its lease long over), then one
    assert [d.id for d in await store.claim_deliveries("a", later, later + S, 5)] == [
        two.id, one.id]
    with pytest.raises(IllegalTransition):
        await store.retry_delivery(one.id, later)  # pending now
    with pytest.raises(NotFound):
        await store.retry_delivery(10**12, later)


async def test_pages_follow_cursors_and_filters(store: Any) -> None:
    await fill(store, "a", range(1, 8))
    await fill(store, "b", range(1, 4))
    seen: list[tuple[str, int]] = []
    cursor = None
    while True:
        page = await store.query_deliveries(DeliveryQuery(limit=3, cursor=cursor))
        seen += [(d.webhook, d.event_id) for d in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [("b", 3), ("b", 2), ("b", 1)] + [("a", i) for i in range(7, 0, -1)]
    d = (await store.claim_deliveries("a", T0, T0 + S, 1))[0]
    await store.finish_delivery(d.id, 1, T0, status=FAILED, next_attempt_at=None,
                                http_status=None, error="refused")

    async def found(**kw: Any) -> list[tuple[str, int]]:
        page = await store.query_deliveries(DeliveryQuery(**kw))
        return [(x.webhook, x.event_id) for x in page.items]

    assert await found(status="failed") == [("a", 1)]
    assert await found(webhook="b", event_id=2) == [("b", 2)]
    assert await found(event_id=1) == [("b", 1), ("a", 1)]
    assert await found(webhook="a", status=PENDING, limit=2) == [("a", 7), ("a", 6)]
    assert await found(webhook="nobody") == []
    with pytest.raises(ValidationError) as caught:
        await store.query_deliveries(DeliveryQuery(cursor="nope"))
    assert caught.value.field == "cursor"


async def test_prune_removes_only_old_finished_deliveries(store: Any) -> None:
    await fill(store, "a", range(1, 6))
    ds = await store.claim_deliveries("a", T0, T0 + S, 5)
    ends = [(DELIVERED, T0), (DELIVERED, T0 + 10 * S), (FAILED, T0), (FAILED, T0 + 20 * S)]
    for d, (status, at) in zip(ds, ends, strict=False):
        await store.finish_delivery(d.id, 1, at, status=status, next_attempt_at=None,
                                    http_status=None, error=None)
    # event 5 stays pending however old
    assert await store.prune_deliveries(T0 + 5 * S, T0 + 30 * S) == 3
    left = (await store.query_deliveries(DeliveryQuery())).items
    assert [(d.event_id, d.status) for d in left] == [(5, PENDING), (2, DELIVERED)]
    assert await store.prune_deliveries(T0, T0) == 0
    assert await store.delivery_counts() == {"a": {PENDING: 1, DELIVERED: 1}}


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def two_pg_stores(postgres: PgServer, runner: asyncio.Runner) -> Any:
    """Two stores (two processes' pools) on one fresh database."""
    dsn = postgres.database()
    stores = [PostgresStore(dsn, max_size=4), PostgresStore(dsn, max_size=4)]
    for s in stores:
        runner.run(s.open())
    yield stores
    for s in stores:
        runner.run(s.close())
    postgres.drop(dsn)


async def test_postgres_two_processes_take_each_event_once(two_pg_stores: Any) -> None:
    one, two = two_pg_stores
    start = await one.webhook_cursor("a", 0)
    assert await two.webhook_cursor("a", 99) == start == 0

    async def take(store: PostgresStore, tag: str) -> bool:
        return await store.enqueue_deliveries(
            "a", 0, 50, [NewDelivery(event_id=i, kind="k", msg_id=f"msg_{i}_{tag}", body="{}")
                         for i in range(1, 51)], T0)

    results = await asyncio.gather(*(take(s, tag) for s, tag in
                                      ((one, "x"), (two, "y"), (one, "z"), (two, "w"))))
    assert sorted(results) == [False, False, False, True]
    page = await one.query_deliveries(DeliveryQuery(limit=1000))
    assert sorted(d.event_id for d in page.items) == list(range(1, 51))
    assert len({d.msg_id.rsplit("_", 1)[1] for d in page.items}) == 1  # one taker's batch


async def test_postgres_claims_by_two_processes_never_overlap(two_pg_stores: Any) -> None:
    one, two = two_pg_stores
    await one.webhook_cursor("a", 0)
    assert await one.enqueue_deliveries(
        "a", 0, 200, [NewDelivery(event_id=i, kind="k", msg_id=f"msg_{i}", body="{}")
                      for i in range(1, 201)], T0)

    async def claim_all(store: PostgresStore) -> list[int]:
        got: list[int] = []
        while batch := await store.claim_deliveries("a", T0, T0 + 60 * S, 7):
            got += [d.id for d in batch]
        return got

    a, b, c, d = await asyncio.gather(claim_all(one), claim_all(two), claim_all(one),
                                      claim_all(two))
    claimed = a + b + c + d
    assert len(claimed) == len(set(claimed)) == 200
    assert (a or c) and (b or d)  # both processes got some
