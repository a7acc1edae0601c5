"""The webhook worker of ``ghostrunner serve``: takes events into the outbox, sends what
is due, prunes what is old (see ``docs/operations.md``, *Webhooks*).

One :class:`Dispatcher` per process, started by the app's lifespan (:func:`delivering`).
Each pass:

1. **take**: read the events after the webhooks' cursors from the event log, and for
   each webhook add a delivery per event it wants and move its cursor past every event
   read, in one store transaction (``enqueue_deliveries``: compare-and-set, so a crash
   skips no event and two processes never take one twice);
2. **send**: claim the deliveries that are due (each webhook at most its
   ``concurrency`` in flight, all of them at most the policy's), and POST each one,
   signed, in a task of its own; record the answer: delivered (2xx), or due again per
   the retry schedule, or given up.

A pass runs every ``poll_interval``, and at once when :meth:`Dispatcher.notify` is
called (an attempt ended, an operator asked for a retry, new events were committed).

**At least once.** A delivery is marked delivered only after its 2xx answer: a process
killed in between sends it again after its lease (``timeout`` + 5 s). A graceful stop
hands the deliveries it was sending back (due at once) before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta

import attrs
import httpx

import ghostrunner
from ghostrunner.errors import GhostRunnerError
from ghostrunner.webhooks import DeliveryStatus, NewDelivery, WebhookDelivery

from ._webhooks import (
    DeliveryPolicy,
    EventSource,
    Webhook,
    WebhookStore,
    last_event_id,
    new_msg_id,
    next_attempt,
    parse_retry_after,
    payload,
    sign,
)

__all__ = ["Attempt", "Dispatcher", "delivering"]

log = logging.getLogger("ghostrunner.webhooks")

#: how long a claim holds a delivery beyond the webhook's timeout
LEASE_MARGIN = timedelta(seconds=5)
#: the most of a receiver's answer read (the rest is not waited for)
MAX_ANSWER = 64 * 1024
#: how often old deliveries are pruned (and once at start)
PRUNE_EVERY = timedelta(hours=6)
#: how long a graceful stop waits for deliveries in flight to be handed back
STOP_GRACE = 5.0


@attrs.frozen
class Attempt:
    """How one POST went: the HTTP status (None: no answer), what went wrong (None:
    a 2xx), and a ``Retry-After`` the receiver asked for (seconds)."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Dispatcher:
    """Takes events into the outbox and sends the deliveries (see the module).

    Args:
        store: the outbox.
        webhooks: the configured webhooks (by name).
        policy: retries, limits, retention.
        source: the event log; None: only what is in the outbox already is sent.
        clock: the current time (the ``webhook-timestamp`` header, schedules).
        client: the HTTP client (default: one of its own, closed with the dispatcher;
            it never follows redirects).
        rng: the retry jitter's randomness.
    """

    def __init__(self, store: WebhookStore, webhooks: Sequence[Webhook],
                 policy: DeliveryPolicy, *, source: EventSource | None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 client: httpx.AsyncClient | None = None,
                 rng: random.Random | None = None) -> None:
        names = [w.name for w in webhooks]
        if len(set(names)) != len(names):
            raise ValueError("two webhooks have the same name")
        self.store = store
        self.webhooks = {w.name: w for w in webhooks}
        self.policy = policy
        self.source = source
        self.clock = clock
        self.rng = rng or random.Random()
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            follow_redirects=False,
            limits=httpx.Limits(max_connections=policy.concurrency,
                                max_keepalive_connections=policy.concurrency),
            headers={"user-agent": f"GhostRunner-Webhooks/{ghostrunner.__version__}"},
        )
        self._cursors: dict[str, int] = {}
        self._sending: dict[asyncio.Task[None], WebhookDelivery] = {}
        self._per_hook: Counter[str] = Counter()
        self._failing: set[str] = set()  # webhooks whose latest attempt failed
        self._wake = asyncio.Event()
        self._closing = False

    # ---------------------------------------------------------------- the passes

    def notify(self) -> None:
        """Run a pass now (new events, a retry, a free slot)."""
        self._wake.set()

    async def take(self) -> int:
        """Take the events after the cursors into the outbox; returns how many
        deliveries were added. Reads until the event log has no more."""
        if self.source is None or not self.webhooks:
            return 0
        if len(self._cursors) < len(self.webhooks):
            start = await last_event_id(self.source)
            for name in self.webhooks:
                if name not in self._cursors:
                    self._cursors[name] = await self.store.webhook_cursor(name, start)
        added = 0
        while True:
            after = min(self._cursors.values())
            events = await self.source.events_after(after, self.policy.batch)
            if not events:
                return added
            upto = events[-1].id
            now = self.clock()
            for name, hook in self.webhooks.items():
                cursor = self._cursors[name]
                if cursor >= upto:
                    continue
                new = [NewDelivery(event_id=e.id, kind=e.kind, msg_id=new_msg_id(e.id),
                                   body=payload(e))
                       for e in events if e.id > cursor and hook.wants(e.kind)]
                if await self.store.enqueue_deliveries(name, cursor, upto, new, now):
                    self._cursors[name] = upto
                    added += len(new)
                else:  # another process took them: carry on from where it left off
                    self._cursors[name] = await self.store.webhook_cursor(name, cursor)
            if len(events) < self.policy.batch:
                return added

    async def send_due(self) -> int:
        """Claim what is due (within the concurrency limits) and start sending it;
        returns how many deliveries were claimed."""
        claimed = 0
        for name, hook in self.webhooks.items():
            free = min(self.policy.concurrency - len(self._sending),
                       hook.concurrency - self._per_hook[name])
            if free <= 0 or self._closing:
                continue
            now = self.clock()
            lease = now + timedelta(seconds=hook.timeout) + LEASE_MARGIN
            for delivery in await self.store.claim_deliveries(name, now, lease, free):
                task = asyncio.create_task(self._send(hook, delivery),
                                           name=f"ghostrunner-webhook-{delivery.id}")
                self._sending[task] = delivery
                self._per_hook[name] += 1
                task.add_done_callback(self._sent)
                claimed += 1
        return claimed

    def _sent(self, task: asyncio.Task[None]) -> None:
        delivery = self._sending.pop(task)
        self._per_hook[delivery.webhook] -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook %r: delivery %d failed unexpectedly: %r", delivery.webhook,
                      delivery.id, task.exception())
        self.notify()

    async def wait_idle(self) -> None:
        """Wait until no delivery is being sent (for tests)."""
        while self._sending:
            await asyncio.wait(list(self._sending))

    # ---------------------------------------------------------------- one attempt

    async def attempt(self, hook: Webhook, delivery: WebhookDelivery) -> Attempt:
        """POST ``delivery`` to ``hook`` once, signed; never follows a redirect, reads
        at most :data:`MAX_ANSWER` bytes of the answer, gives up after the webhook's
        timeout."""
        body = delivery.body.encode("utf-8")
        timestamp = int(self.clock().timestamp())
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(hook.key, delivery.msg_id, timestamp, body),
        }
        try:
            async with asyncio.timeout(hook.timeout):
                async with self.client.stream(
                        "POST", hook.url, content=body, headers=headers,
                        timeout=httpx.Timeout(hook.timeout)) as answer:
                    excerpt = await _read_some(answer)
        except TimeoutError:
            return Attempt(None, f"no answer within {hook.timeout:g} s")
        except httpx.TimeoutException:
            return Attempt(None, f"timed out ({hook.timeout:g} s)")
        except httpx.HTTPError as exc:
            return Attempt(None, _clean(f"{type(exc).__name__}: {exc}", hook))
        except OSError as exc:
            return Attempt(None, _clean(f"{type(exc).__name__}: {exc}", hook))
        status = answer.status_code
        if 200 <= status < 300:
            return Attempt(status)
        reason = f"HTTP {status}"
        if 300 <= status < 400:
            reason += " (redirects are not followed: point the webhook at the final URL)"
        elif excerpt:
            reason += ": " + excerpt
        return Attempt(status, _clean(reason, hook),
                       parse_retry_after(answer.headers.get("retry-after"), self.clock()))

    async def _send(self, hook: Webhook, delivery: WebhookDelivery) -> None:
        try:
            result = await self.attempt(hook, delivery)
        except Exception as exc:  # a bug: count it as a failed attempt, not a lost lease
            log.exception("webhook %r: delivery %d: unexpected error", hook.name, delivery.id)
            result = Attempt(None, f"internal error: {type(exc).__name__}")
        except asyncio.CancelledError:
            # stopping: hand it back, due at once, so the next start sends it without
            # waiting for the lease (it may have reached the receiver: at least once)
            with contextlib.suppress(GhostRunnerError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self.store.finish_delivery(
                        delivery.id, delivery.attempts, self.clock(),
                        status=DeliveryStatus.PENDING, next_attempt_at=self.clock(),
                        http_status=None, error="interrupted: the server stopped"))
            raise
        await self.record(hook, delivery, result)

    async def record(self, hook: Webhook, delivery: WebhookDelivery, result: Attempt) -> None:
        """Store how an attempt went: delivered, due again, or given up."""
        now = self.clock()
        retry_at: datetime | None = None
        if result.delivered:
            status = DeliveryStatus.DELIVERED
        elif result.status == 410:  # Gone: the receiver wants no more (the spec's advice)
            status = DeliveryStatus.FAILED
        else:
            retry_at = next_attempt(self.policy, delivery, now, self.rng,
                                    retry_after=result.retry_after)
            status = DeliveryStatus.FAILED if retry_at is None else DeliveryStatus.PENDING
        try:
            await self.store.finish_delivery(
                delivery.id, delivery.attempts, now, status=status, next_attempt_at=retry_at,
                http_status=result.status, error=result.error)
        except GhostRunnerError as exc:  # the lease runs out: it is sent again
            log.warning("webhook %r: could not record delivery %d (%s): it will be sent "
                        "again", hook.name, delivery.id, exc)
            return
        if result.delivered:
            log.debug("webhook %r: delivered %s (event %d)", hook.name, delivery.msg_id,
                      delivery.event_id)
            if hook.name in self._failing:
                self._failing.discard(hook.name)
                log.info("webhook %r: delivering again", hook.name)
            return
        if hook.name not in self._failing:
            self._failing.add(hook.name)
            log.warning("webhook %r (%s): attempt failed (%s); retrying per the schedule",
                        hook.name, hook.origin, result.error)
        if status is DeliveryStatus.FAILED:
            log.warning("webhook %r: gave up on %s (event %d, %s) after %d attempt(s): %s",
                        hook.name, delivery.msg_id, delivery.event_id, delivery.kind,
                        delivery.attempts, result.error)

    # ---------------------------------------------------------------- running

    async def pass_once(self) -> None:
        """One pass: take, then send."""
        await self.take()
        await self.send_due()

    async def run(self) -> None:
        """Passes until cancelled; a failing store or event log is logged (once per
        streak) and tried again at the next pass."""
        trouble = False
        while True:
            self._wake.clear()
            try:
                await self.pass_once()
            except GhostRunnerError as exc:
                if not trouble:
                    log.warning("webhooks: the store or the event log failed (%s); "
                                "trying again", exc)
                trouble = True
            except Exception:  # a bug, or an event source's own error: keep working
                if not trouble:
                    log.exception("webhooks: a pass failed; trying again")
                trouble = True
            else:
                if trouble:
                    log.info("webhooks: the store answers again")
                trouble = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.policy.poll_interval):
                    await self._wake.wait()

    async def prune(self) -> int:
        """Remove old delivered and failed deliveries (the policy's retention)."""
        now = self.clock()
        return await self.store.prune_deliveries(
            now - timedelta(days=self.policy.retention_days),
            now - timedelta(days=self.policy.failed_retention_days))

    async def _pruning(self) -> None:
        while True:
            try:
                pruned = await self.prune()
            except Exception as exc:
                log.warning("could not prune the webhook outbox: %s", exc)
            else:
                if pruned:
                    log.info("webhook outbox: pruned %d old deliveries", pruned)
            await asyncio.sleep(PRUNE_EVERY.total_seconds())

    async def warn_unconfigured(self) -> None:
        """Log the webhooks with pending deliveries that are not configured (kept, not
        sent)."""
        try:
            counts = await self.store.delivery_counts()
        except GhostRunnerError as exc:
            log.warning("webhooks: could not read the outbox: %s", exc)
            return
        for name, by_status in sorted(counts.items()):
            pending = by_status.get(DeliveryStatus.PENDING, 0)
            if name not in self.webhooks and pending:
                log.warning("webhook %r is not configured: its %d pending deliveries are "
                            "kept, not sent (configure it again, under this name, to send "
                            "them)", name, pending)

    async def stop(self) -> None:
        """Stop sending: the deliveries in flight are handed back (due at once)."""
        self._closing = True
        tasks = list(self._sending)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE)
        if self._own_client:
            await self.client.aclose()


async def _read_some(answer: httpx.Response) -> str:
    """The start of an answer's body as one line of text (at most 200 characters), having
    read at most :data:`MAX_ANSWER` bytes of it."""
    got = b""
    if answer.is_stream_consumed:  # read already (a transport that does not stream)
        got = answer.content[:MAX_ANSWER]
    else:  # raw: a compressed answer is not inflated (it was not asked for, either)
        async for chunk in answer.aiter_raw():
            got += chunk
            if len(got) >= MAX_ANSWER:
                break
    text = got[:800].decode("utf-8", "replace")
    return " ".join(text.split())[:200]


def _clean(text: str, hook: Webhook) -> str:
    """An error without the webhook's URL (its path or query may be a secret of the
    receiver's): its origin stands in."""
    for secret in (hook.url, hook.url.split("?", 1)[0]):
        if len(secret) > len(hook.origin):
            text = text.replace(secret, hook.origin + "/…")
    return text


@contextlib.asynccontextmanager
async def delivering(store: WebhookStore, webhooks: Sequence[Webhook],
                     policy: DeliveryPolicy, *, source: EventSource | None,
                     clock: Callable[[], datetime]) -> AsyncIterator[Dispatcher]:
    """Run a :class:`Dispatcher` (its passes and the pruning) in the background while
    the block runs; stop it at the end, handing back what it was sending."""
    dispatcher = Dispatcher(store, webhooks, policy, source=source, clock=clock)
    if source is None:
        log.warning("webhooks: the store keeps no event log (a custom store without "
                    "events_after): no new event is sent (deliveries already in its outbox "
                    "still are)")
    for hook in webhooks:
        log.info("webhook %r: %s, events %s", hook.name, hook.origin, ", ".join(hook.events))
    await dispatcher.warn_unconfigured()
    tasks = [asyncio.create_task(dispatcher.run(), name="ghostrunner-webhooks"),
             asyncio.create_task(dispatcher._pruning(), name="ghostrunner-webhooks-prune")]
    try:
        yield dispatcher
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await dispatcher.stop()
