"""Webhooks through the app: the worker started by the lifespan sends the events of the
store's event log to a receiver on loopback; ``GET /webhooks``, ``GET
/webhooks/deliveries`` (admin, filters, pages), ``POST /webhooks/deliveries/{id}/retry``
(admin, audited, same message id); the console's Webhooks page (admin only, CSRF,
escaping).

The store is a plain ``InMemoryStore``; its events are the ones the facade writes for
what the tests do through the API: a task created on an online device (``task.created``,
``run.claimed``, ``run.finished``: the fake device answers at once) or on an offline one
and cancelled (``task.created``, ``runs.cancelled``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ghostrunner import Event
from ghostrunner.testing import InMemoryStore
from ghostrunner.tokens import Scope
from ghostrunner_http import Settings
from ghostrunner_http._webhooks import DeliveryPolicy, Webhook, parse_secret
from tests.http.conftest import ADMIN, Api, ApiFactory
from tests.http.test_http_audit import entries
from tests.http.test_http_console import XSS, Browser
from tests.webhookkit import SECRET, Receiver

ONLINE, OFFLINE = "node-001", "node-002"


class NoOutbox(InMemoryStore):
    """A store that keeps no webhook outbox."""

    webhook_cursor = None  # type: ignore[assignment]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def settings(receiver: Receiver, **policy: Any) -> Settings:
    key = parse_secret(SECRET)
    return Settings(executor="fake", admin_token=ADMIN, webhook_policy=DeliveryPolicy(
        **{**{"schedule": (0.05,), "jitter": 0, "max_attempts": 1, "poll_interval": 0.02},
           **policy}),
        webhooks=(Webhook(name="all", url=receiver.url, key=key),
                  Webhook(name="runs", url=receiver.url, key=key, events=("run.*",))))


def wait(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return found


def deliveries(api: Api, **params: Any) -> list[dict[str, Any]]:
    r = api.get("/webhooks/deliveries", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["data"]["deliveries"]
    return found


def started(api_factory: ApiFactory, receiver: Receiver, **policy: Any) -> Api:
    """The app over a plain InMemoryStore, ``ONLINE`` online, once the webhook worker's
    first pass has set both cursors (a webhook gets the events committed from then on)."""
    store = InMemoryStore()
    api = api_factory(settings=settings(receiver, **policy), store=store, online=(ONLINE,))
    wait(lambda: set(store.cursors) == {"all", "runs"})
    return api


def task_events(api: Api, task_id: str) -> list[Event]:
    return [e for e in api.store.events if e.task_id == task_id]


def run_once(api: Api) -> list[Event]:
    """A task on the online device, run to its end: its 3 events."""
    task_id = api.create([ONLINE], name="runs-once")["id"]
    api.wait_done(task_id)
    events = task_events(api, task_id)
    assert [e.kind for e in events] == ["task.created", "run.claimed", "run.finished"]
    return events


def cancelled(api: Api, name: str = "cancelled") -> list[Event]:
    """A task on the offline device, cancelled: its 2 events (task-level only)."""
    task_id = api.create([OFFLINE], name=name)["id"]
    assert api.post(f"/tasks/{task_id}/cancel").status_code == 200
    events = task_events(api, task_id)
    assert [e.kind for e in events] == ["task.created", "runs.cancelled"]
    return events


def test_events_are_delivered_and_listed(api_factory: ApiFactory, receiver: Receiver) -> None:
    api = started(api_factory, receiver)
    created, claimed, finished = (e.id for e in run_once(api))
    wait(lambda: len(receiver.got) == 5)  # 3 for "all", 2 for "runs"
    assert all(r.valid for r in receiver.got)
    wait(lambda: all(d["status"] == "delivered" for d in deliveries(api)))
    listed = deliveries(api)
    assert [d["id"] for d in listed] == sorted((d["id"] for d in listed), reverse=True)
    assert sorted((d["webhook"], d["event_id"]) for d in listed) == sorted([
        ("runs", finished), ("runs", claimed), ("all", finished), ("all", claimed),
        ("all", created)])
    d = deliveries(api, webhook="runs", event_id=finished)[0]
    assert d["kind"] == "run.finished" and d["attempts"] == 1 and d["sending"] is False
    assert d["msg_id"].startswith(f"msg_{finished}_") and d["finished_at"] is not None
    assert d["next_attempt_at"] is None and d["last_error"] is None
    assert {r.msg_id for r in receiver.got} == {x["msg_id"] for x in listed}
    # what was sent is the event as the store keeps it
    sent = next(r.body for r in receiver.got if r.msg_id == d["msg_id"])
    assert sent is not None and sent["type"] == "run.finished"
    assert sent["data"]["id"] == finished and sent["data"]["node_id"] == ONLINE
    assert sent["data"]["data"]["state"] == "succeeded"

    hooks = api.get("/webhooks").json()["data"]
    assert hooks["event_log"] is True
    assert [(w["name"], w["configured"], w["cursor"], w["counts"]) for w in hooks["webhooks"]
            ] == [("all", True, finished, {"pending": 0, "delivered": 3, "failed": 0}),
                  ("runs", True, finished, {"pending": 0, "delivered": 2, "failed": 0})]
    assert hooks["webhooks"][1]["events"] == ["run.*"]
    assert hooks["webhooks"][0]["url"] == f"http://127.0.0.1:{receiver.port}"  # origin only

    # filters and pages
    assert [d["event_id"] for d in deliveries(api, webhook="runs")] == [finished, claimed]
    assert {d["webhook"] for d in deliveries(api, event_id=claimed)} == {"runs", "all"}
    assert [d["webhook"] for d in deliveries(api, event_id=created)] == ["all"]
    assert deliveries(api, status="failed") == []
    first = api.get("/webhooks/deliveries", params={"limit": 2}).json()["data"]
    second = api.get("/webhooks/deliveries",
                     params={"limit": 2, "cursor": first["next_cursor"]}).json()["data"]
    assert [d["id"] for d in first["deliveries"] + second["deliveries"]] == [
        d["id"] for d in listed[:4]]


def test_a_failed_delivery_is_sent_again_by_an_admin(api_factory: ApiFactory,
                                                     receiver: Receiver) -> None:
    receiver.answers = [500, 500]  # both events' first attempt; one attempt allowed
    receiver.answer_body = XSS.encode()
    api = started(api_factory, receiver)
    cancelled(api)  # two task-level events: for "all" only
    failed = wait(lambda: len(found := deliveries(api, status="failed")) == 2 and found)
    assert {d["webhook"] for d in failed} == {"all"}
    one = failed[0]
    assert one["last_status"] == 500 and one["attempts"] == 1
    assert one["last_error"].startswith("HTTP 500: <script>")
    writer = api.token("writer", Scope.WRITE)
    assert api.post(f"/webhooks/deliveries/{one['id']}/retry", token=writer).status_code == 403

    r = api.post(f"/webhooks/deliveries/{one['id']}/retry")
    assert r.status_code == 200, r.text
    again = r.json()["data"]
    assert (again["status"], again["attempts"], again["msg_id"]) == (
        "pending", 0, one["msg_id"])
    audit = entries(api, route="/webhooks/deliveries/{delivery_id}/retry")
    assert [(e["token"], e["status"], e["counts"]) for e in audit] == [
        ("admin", 200, {"deliveries": 1}), ("writer", 403, {})]
    wait(lambda: [d["status"] for d in deliveries(api, event_id=one["event_id"])]
         == ["delivered"])
    assert [d["status"] for d in deliveries(api, status="failed")] == ["failed"]  # the other
    # the receiver got it twice, under the same message id: a duplicate it can drop
    assert [r.msg_id for r in receiver.got].count(one["msg_id"]) == 2

    assert api.post(f"/webhooks/deliveries/{one['id']}/retry").status_code == 409
    assert api.post("/webhooks/deliveries/999999/retry").status_code == 404
    r = api.post("/webhooks/deliveries/abc/retry")
    assert r.status_code == 422 and r.json()["data"]["field"] == "delivery_id"


def test_only_admins_see_and_retry_deliveries(api_factory: ApiFactory,
                                              receiver: Receiver) -> None:
    api = started(api_factory, receiver)
    for scope in (Scope.READ, Scope.WRITE):
        token = api.token(f"t-{scope.value}", scope)
        assert api.get("/webhooks", token=token).status_code == 403
        assert api.get("/webhooks/deliveries", token=token).status_code == 403
        assert api.post("/webhooks/deliveries/1/retry", token=token).status_code == 403
    assert api.get("/webhooks/deliveries", token=None).status_code == 401


@pytest.mark.parametrize(("params", "field"), [
    ({"status": "bogus"}, "status"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
    ({"event_id": "x"}, "event_id"), ({"event_id": "-1"}, "event_id"),
    ({"event_id": "99999999999999999999"}, "event_id"), ({"cursor": "x"}, "cursor"),
    ({"webhook": ""}, "webhook"), ({"nope": "1"}, "nope"),
])
def test_bad_filters_are_422_naming_the_field(api: Api, params: dict[str, str],
                                              field: str) -> None:
    r = api.get("/webhooks/deliveries", params=params)
    assert r.status_code == 422, r.text
    assert r.json()["data"]["field"] == field


def test_with_no_webhook_configured_the_api_lists_none(api: Api) -> None:
    data = api.get("/webhooks").json()["data"]
    assert data == {"webhooks": [], "event_log": True}  # every shipped store keeps one
    assert deliveries(api) == []


def test_a_store_without_an_outbox_answers_404(api_factory: ApiFactory) -> None:
    api = api_factory(store=NoOutbox())
    assert api.get("/webhooks").status_code == 404
    assert api.get("/webhooks/deliveries").status_code == 404
    assert api.post("/webhooks/deliveries/1/retry").status_code == 404
    b = Browser(api.client)
    b.sign_in(ADMIN)
    assert "keeps no webhook outbox" in b.get("/ui/webhooks").text


def test_webhooks_no_longer_configured_are_listed_as_such(api_factory: ApiFactory,
                                                         receiver: Receiver) -> None:
    api = started(api_factory, receiver)
    cancelled(api)
    wait(lambda: len(receiver.got) == 2)
    assert isinstance(api.store, InMemoryStore)
    api.store.cursors["gone"] = 7  # a webhook removed from the configuration
    rows = {w["name"]: w for w in api.get("/webhooks").json()["data"]["webhooks"]}
    assert (rows["gone"]["configured"], rows["gone"]["url"], rows["gone"]["cursor"]) == (
        False, None, 7)


# --------------------------------------------------------------------------- console


def test_the_console_page_shows_delivery_state_to_admins(api_factory: ApiFactory,
                                                         receiver: Receiver) -> None:
    receiver.answers = [500]  # the first request; the answer's body is shown, escaped
    receiver.answer_body = XSS.encode()
    api = started(api_factory, receiver)
    cancelled(api, name=XSS)  # two events for "all"
    wait(lambda: len(deliveries(api, status="failed")) == 1
         and len(deliveries(api, status="delivered")) == 1)
    admin = Browser(api.client)
    admin.sign_in(ADMIN)
    page = admin.get("/ui/webhooks")
    assert page.status_code == 200
    text = page.text
    assert 'href="/ui/webhooks"' in text and "<h1>Webhooks</h1>" in text
    assert "<script>alert" not in text and "&lt;script&gt;alert(" in text  # escaped
    assert f"http://127.0.0.1:{receiver.port}" in text and "/hook" not in text
    failed = deliveries(api, status="failed")[0]
    assert failed["msg_id"] in text
    assert f'action="/ui/webhooks/deliveries/{failed["id"]}/retry"' in text
    assert text.count("/retry\"") == 1  # only the failed one has the button
    filtered = admin.get("/ui/webhooks", params={"status": "failed"}).text
    assert filtered.count("<code>msg_") == 1
    assert admin.get("/ui/webhooks", params={"event_id": "x"}).status_code == 422

    # no CSRF token: refused, nothing retried
    path = f"/ui/webhooks/deliveries/{failed['id']}/retry"
    assert admin.post(path, csrf=None).status_code == 403
    assert deliveries(api, status="failed") != []
    r = admin.post(path)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/webhooks")
    wait(lambda: deliveries(api, status="failed") == [])
    assert "will be sent again" in admin.get(r.headers["location"]).text
    assert entries(api, route="/ui/webhooks/deliveries/{delivery_id}/retry")[0][
        "counts"] == {"deliveries": 1}
    # a second time: it is not failed any more
    r = admin.post(path)
    assert r.status_code == 303
    assert "not failed" in admin.get(r.headers["location"]).text
    assert admin.post("/ui/webhooks/deliveries/999999/retry").status_code == 404

    writer = api.token("writer", Scope.WRITE)
    other = Browser(api.client)
    other.sign_in(writer)
    assert other.get("/ui/webhooks").status_code == 403
    assert other.post(path).status_code == 403
    assert 'href="/ui/webhooks"' not in other.get("/ui/").text
    assert Browser(api.client).get("/ui/webhooks").status_code == 303  # signed out


def test_the_console_page_says_when_no_webhook_is_configured(api: Api) -> None:
    admin = Browser(api.client)
    admin.sign_in(ADMIN)
    text = admin.get("/ui/webhooks").text
    assert "No webhook is configured." in text
    assert "keeps no event log" not in text  # the store has one
