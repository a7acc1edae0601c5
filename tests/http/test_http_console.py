"""The operator console under /ui, through the ASGI app: sign-in and sessions, cookie
flags, CSRF on every write, what a read token sees and may do, escaping of everything
user-supplied, security headers, pagination, the queue form and token management.

The browser-level scenarios (a real Chromium against a real ``ghostrunner serve``) are
in ``tests/browser``.
"""

from __future__ import annotations

import html
import re
import warnings
from typing import Any

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from ghostrunner import RunState
from ghostrunner.testing import FakeExecutor, InMemoryStore
from ghostrunner.tokens import Scope
from ghostrunner_http import Settings, create_app
from ghostrunner_http.console import COOKIE
from tests.http.conftest import ADMIN, Api, ApiFactory

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class Browser:
    """A browser on a started app's TestClient: its own cookie jar (several browsers can
    share one client), redirects not followed."""

    def __init__(self, client: TestClient, base: str = "http://testserver") -> None:
        self.client = client
        self.base = base
        self.jar = httpx.Cookies()
        self.csrf = ""

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        self.client.cookies = self.jar
        try:
            return self.client.request(method, self.base + path, follow_redirects=False,
                                       **kw)
        finally:
            self.jar = httpx.Cookies(self.client.cookies)
            self.client.cookies = httpx.Cookies()

    def sign_in(self, token: str) -> httpx.Response:
        r = self.request("POST", "/ui/login", data={"token": token})
        if r.status_code == 303:
            self.csrf = csrf_of(self.get("/ui/").text)
        return r

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict[str, Any] | None = None, *, csrf: str | None = "",
             **kw: Any) -> httpx.Response:
        """``csrf=""``: the session's; None: none sent."""
        form = dict(data or {})
        if csrf is not None:
            form["csrf"] = csrf or self.csrf
        return self.request("POST", path, data=form, **kw)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF field on the page"
    return found.group(1)


@pytest.fixture
def browser(api: Api) -> Browser:
    b = Browser(api.client)
    assert b.sign_in(ADMIN).status_code == 303
    return b


def fresh(api: Api) -> Browser:
    """Another browser (its own cookie jar) on the same app."""
    return Browser(api.client)


def flash(page: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'class="flash[^"]*"[^>]*>([^<]*)<', page)]


# --------------------------------------------------------------------------- sign-in


def test_signed_out_pages_go_to_the_sign_in_form(api: Api) -> None:
    for path in ("/ui/", "/ui/tasks", "/ui/devices", "/ui/queue", "/ui/tokens"):
        r = api.client.get(path, follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login"), path
    assert api.client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    r = api.client.get("/ui/login")
    assert r.status_code == 200
    assert 'type="password"' in r.text and 'for="token"' in r.text
    # the page script's JSON answers 401 rather than redirecting
    task = api.create()
    assert api.client.get(f"/ui/tasks/{task['id']}/live").status_code == 401


def test_sign_in_sets_a_session_cookie_never_the_token(api: Api) -> None:
    b = Browser(api.client)
    r = b.sign_in(ADMIN)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/")
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= flags
    assert "secure" not in flags  # plain http: a Secure cookie would never come back
    assert ADMIN not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert len(value) >= 40 and value != ADMIN
    page = b.get("/ui/").text
    assert "Signed in as <strong>admin</strong>" in page
    assert ADMIN not in page


def test_cookie_is_secure_under_tls(api: Api) -> None:
    r = Browser(api.client, "https://testserver").sign_in(ADMIN)
    flags = {part.strip().lower() for part in r.headers["set-cookie"].split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/ui"} <= flags


def test_a_wrong_token_is_refused_without_a_cookie(api: Api) -> None:
    for secret in ("wrong", "", "x" * 5000):
        r = api.client.post("/ui/login", data={"token": secret}, follow_redirects=False)
        assert r.status_code == 401
        assert "set-cookie" not in r.headers
        assert "not valid" in r.text
        if secret:
            assert secret not in r.text  # not echoed back into the form


def test_sign_in_from_another_origin_is_refused(api: Api) -> None:
    r = api.client.post("/ui/login", data={"token": ADMIN}, follow_redirects=False,
                        headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert "set-cookie" not in r.headers


def test_sign_out_ends_the_session_on_the_server(api: Api, browser: Browser) -> None:
    saved = httpx.Cookies(browser.jar)
    assert saved.get(COOKIE)
    r = browser.post("/ui/logout")
    assert (r.status_code, r.headers["location"]) == (303, "/ui/login")
    assert 'max-age=0' in r.headers["set-cookie"].lower()
    # the old cookie, replayed, opens nothing
    other = fresh(api)
    other.jar = saved
    assert other.get("/ui/").headers["location"] == "/ui/login"


def test_a_revoked_token_ends_its_sessions_at_once(api: Api, browser: Browser) -> None:
    secret = api.token("ops", Scope.WRITE)
    ops = fresh(api)
    assert ops.sign_in(secret).status_code == 303
    assert ops.get("/ui/").status_code == 200
    api.delete("/token/delete", json={"details": {"name": "ops"}})  # through the API
    assert ops.get("/ui/").headers["location"] == "/ui/login"


def test_security_headers_on_every_page(api: Api, browser: Browser) -> None:
    task = api.create()
    signed_out = fresh(api)
    for who, path in ((signed_out, "/ui/login"), (browser, "/ui/"), (browser, "/ui/tasks"),
                      (browser, f"/ui/tasks/{task['id']}"), (browser, "/ui/devices")):
        r = who.get(path)
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        assert "<script>" not in r.text  # the only script is the static file
        assert re.findall(r"<script[^>]*>", r.text) == [
            '<script src="/ui/static/console.js" defer>']
    js = browser.get("/ui/static/console.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["x-content-type-options"] == "nosniff"
    assert browser.get("/ui/static/console.css").status_code == 200


# --------------------------------------------------------------------------- CSRF


def _write_routes(task_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/ui/logout", {}),
        ("/ui/queue", {"name": "n", "command": "echo", "nodeids": "node-001"}),
        (f"/ui/tasks/{task_id}/cancel", {}),
        (f"/ui/tasks/{task_id}/retry", {"states": "cancelled"}),
        (f"/ui/tasks/{task_id}/pause", {}),
        (f"/ui/tasks/{task_id}/resume", {}),
        (f"/ui/tasks/{task_id}/delete", {}),
        ("/ui/flush", {}),
        ("/ui/tokens", {"name": "new", "scope": "read"}),
        ("/ui/tokens/revoke", {"name": "victim"}),
    ]


WRITES = [path for path, _ in _write_routes("{id}")]


@pytest.mark.parametrize("route", WRITES)
@pytest.mark.parametrize("csrf", [None, "wrong", "cross-origin"])
def test_every_write_needs_the_session_csrf_token(api: Api, browser: Browser, route: str,
                                                  csrf: str | None) -> None:
    api.token("victim", Scope.READ)
    task = api.create()
    path = route.replace("{id}", task["id"])
    data = dict(_write_routes(task["id"]))[path]
    before = (api.show(task["id"]), sorted(t.name for t in api.store.tokens.values()))
    headers = {}
    token = csrf
    if csrf == "cross-origin":  # the right token, from a page of another site
        token, headers = "", {"Origin": "https://evil.example"}
    r = browser.post(path, data, csrf=token, headers=headers)
    assert r.status_code == 403, (route, r.status_code)
    assert "CSRF" in r.text
    after = (api.show(task["id"]), sorted(t.name for t in api.store.tokens.values()))
    assert after == before
    assert browser.get("/ui/").status_code == 200  # still signed in (logout refused too)


@pytest.mark.parametrize("route", WRITES)
def test_every_write_works_with_the_csrf_token(api: Api, browser: Browser,
                                               route: str) -> None:
    api.token("victim", Scope.READ)
    task = api.create()
    data = dict(_write_routes(task["id"]))[route.replace("{id}", task["id"])]
    r = browser.post(route.replace("{id}", task["id"]), data)
    assert r.status_code in (200, 303), (route, r.status_code, r.text[:500])
    # the CSRF token may also come as a header (for scripts)
    if route == "/ui/tasks/{id}/pause":
        r = browser.post(route.replace("{id}", task["id"]), csrf=None,
                         headers={"X-CSRF-Token": browser.csrf})
        assert r.status_code == 303


def test_each_session_has_its_own_csrf_token(api: Api, browser: Browser) -> None:
    other = fresh(api)
    other.sign_in(ADMIN)
    assert other.csrf != browser.csrf
    task = api.create()
    r = browser.post(f"/ui/tasks/{task['id']}/cancel", csrf=other.csrf)
    assert r.status_code == 403


# --------------------------------------------------------------------------- scopes


def test_a_read_token_sees_no_write_controls(api: Api) -> None:
    task = api.create()
    reader = fresh(api)
    assert reader.sign_in(api.token("viewer", Scope.READ)).status_code == 303
    for path in ("/ui/", "/ui/tasks", f"/ui/tasks/{task['id']}",
                 f"/ui/tasks/{task['id']}/run?node=node-001", "/ui/devices",
                 "/ui/device?node=node-001"):
        page = reader.get(path).text
        actions = re.findall(r'<form method="post" action="([^"]+)"', page)
        assert actions == ["/ui/logout"], (path, actions)
        for word in ("Queue a command", "Cancel pending", "Retry", "Delete", "Flush",
                     "Tokens"):
            assert word not in page, (path, word)
    for path in ("/ui/queue", "/ui/flush", f"/ui/tasks/{task['id']}/delete", "/ui/tokens"):
        assert reader.get(path).status_code == 403, path


def test_a_read_token_writes_are_refused_by_the_server(api: Api) -> None:
    api.token("victim", Scope.READ)
    task = api.create()
    reader = fresh(api)
    reader.sign_in(api.token("viewer", Scope.READ))
    before = (api.show(task["id"]), len(api.store.tokens))
    for path, data in _write_routes(task["id"]):
        if path == "/ui/logout":
            continue
        r = reader.post(path, data)
        assert r.status_code == 403, path
        assert "needs a token with scope" in r.text
    assert (api.show(task["id"]), len(api.store.tokens)) == before


def test_a_write_token_cannot_manage_tokens(api: Api) -> None:
    writer = fresh(api)
    writer.sign_in(api.token("ops", Scope.WRITE))
    page = writer.get("/ui/").text
    assert "/ui/tokens" not in page and "/ui/queue" in page
    assert writer.get("/ui/tokens").status_code == 403
    assert writer.post("/ui/tokens", {"name": "x", "scope": "admin"}).status_code == 403
    assert "x" not in api.store.tokens


# --------------------------------------------------------------------------- escaping


def test_user_supplied_text_renders_as_text(api_factory: ApiFactory) -> None:
    executor = FakeExecutor()
    executor.add_device("node//evil", name=XSS, online=True)
    executor.update_device("node//evil", tags=(XSS,), os=XSS, group_name=XSS)
    api = api_factory(executor=executor)
    task = api.create(nodeids=["node//evil"], name=XSS, command=f"echo '{XSS}'")
    api.wait_done(task["id"])  # the fake echoes the command: the output holds it too
    b = Browser(api.client)
    b.sign_in(ADMIN)
    pages = ["/ui/", "/ui/tasks", f"/ui/tasks/{task['id']}", "/ui/devices",
             f"/ui/tasks/{task['id']}/run?node=node%2F%2Fevil", "/ui/device?node=node%2F%2Fevil",
             "/ui/queue", f"/ui/tasks?name={XSS}"]
    for path in pages:
        page = b.get(path).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert "&lt;script&gt;alert(" in page, path
    out = b.get(f"/ui/tasks/{task['id']}/run?node=node%2F%2Fevil").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in out


def test_hostile_node_ids_stay_inside_their_urls(api_factory: ApiFactory) -> None:
    node = 'a"b?c=1&d/../e#f'
    executor = FakeExecutor(devices=[node])
    api = api_factory(executor=executor)
    task = api.create(nodeids=[node])
    b = Browser(api.client)
    b.sign_in(ADMIN)
    page = b.get(f"/ui/tasks/{task['id']}").text
    assert 'href="/ui/device?node=a%22b%3Fc%3D1%26d%2F..%2Fe%23f"' in page
    assert b.get("/ui/device?node=a%22b%3Fc%3D1%26d%2F..%2Fe%23f").status_code == 200


def test_tokens_never_appear_in_urls_or_pages(api: Api, browser: Browser) -> None:
    secret = api.token("ops", Scope.WRITE)
    task = api.create()
    seen: list[str] = []
    for path in ("/ui/", "/ui/tasks", f"/ui/tasks/{task['id']}", "/ui/devices", "/ui/queue",
                 "/ui/tokens", f"/ui/tasks/{task['id']}/live"):
        r = browser.get(path)
        seen.append(r.text)
        seen.append(str(r.headers))
    r = browser.post(f"/ui/tasks/{task['id']}/pause")
    seen.append(r.headers["location"])
    for text in seen:
        assert ADMIN not in text and secret not in text


# --------------------------------------------------------------------------- pages


def test_overview_counts_devices_and_failures(api_factory: ApiFactory) -> None:
    def fail(request: Any, device: Any) -> Any:
        from ghostrunner import Outcome

        return Outcome(exit_code=3, output="boom\n")

    executor = FakeExecutor(fail, devices=["node-001", "node-002"])
    executor.set_online("node-001")
    api = api_factory(executor=executor)
    failed = api.create(nodeids=["node-001"], name="broken-thing")
    api.wait_done(failed["id"])
    api.create(nodeids=["node-002"], name="waiting-thing")
    b = Browser(api.client)
    b.sign_in(ADMIN)
    page = b.get("/ui/").text
    assert 'aria-label="1 failed: tasks with such runs"' in page
    assert 'aria-label="1 pending: tasks with such runs"' in page
    assert '<a href="/ui/devices?show=online">1</a>' in page
    assert '<a href="/ui/devices?show=offline">1</a>' in page
    failures = page.split('id="h-fail"')[1].split('id="h-recent"')[0]
    assert "broken-thing" in failures and "waiting-thing" not in failures
    assert re.search(r"Executor \(custom\)</dt>\s*<dd id=\"connection\">unknown</dd>", page)


def test_task_list_filters_and_pages(api: Api, browser: Browser) -> None:
    for i in range(60):
        api.create(name="alpha" if i % 2 else "beta")
    page = browser.get("/ui/tasks").text
    assert page.count('<a href="/ui/tasks/') == 50
    nxt = re.search(r'<a href="([^"]+)" rel="next">', page)
    assert nxt is not None
    second = browser.get(html.unescape(nxt.group(1))).text
    assert second.count('<a href="/ui/tasks/') == 10
    assert "First page" in second
    only = browser.get("/ui/tasks", params={"name": "alpha", "status": "", "state": ""}).text
    assert only.count('<a href="/ui/tasks/') == 30 and "beta" not in only
    none = browser.get("/ui/tasks", params={"status": "succeeded"}).text
    assert "No tasks." in none
    bad = browser.get("/ui/tasks", params={"status": "nonsense"})
    assert bad.status_code == 422 and "status: must be one of" in bad.text


def test_task_page_paginates_runs_and_filters_by_state(api_factory: ApiFactory) -> None:
    nodes = [f"n{i:04d}" for i in range(250)]
    api = api_factory(executor=FakeExecutor(devices=nodes))
    task = api.create(nodeids=nodes)
    api.post(f"/tasks/{task['id']}/cancel", json={"nodeids": nodes[:5]})
    b = Browser(api.client)
    b.sign_in(ADMIN)
    page = b.get(f"/ui/tasks/{task['id']}").text
    assert page.count('<tr data-node="') == 100
    assert "Runs 1–100 of 250" in page  # noqa: RUF001 - the page says so
    last = b.get(f"/ui/tasks/{task['id']}", params={"start": 200}).text
    assert last.count('<tr data-node="') == 50 and 'rel="prev"' in last
    assert 'rel="next"' not in last
    cancelled = b.get(f"/ui/tasks/{task['id']}", params={"state": "cancelled"}).text
    assert cancelled.count('<tr data-node="') == 5
    live = b.get(f"/ui/tasks/{task['id']}/live", params={"start": 100}).json()
    assert live["counts"]["cancelled"] == 5 and live["counts"]["pending"] == 245
    assert list(live["rows"]) == nodes[100:200]
    assert live["rows"]["n0100"]["state"] == "pending"


def test_live_rows_say_whether_each_device_is_online_now(api: Api, browser: Browser
                                                         ) -> None:
    task = api.create(nodeids=["node-002", "not-a-device"])
    page = browser.get(f"/ui/tasks/{task['id']}").text
    assert page.count('data-field="device">offline<') == 1  # the unknown one: no mark

    def rows() -> dict[str, Any]:
        found: dict[str, Any] = browser.get(f"/ui/tasks/{task['id']}/live").json()["rows"]
        return found

    assert rows()["node-002"]["device"] == "offline"
    assert rows()["not-a-device"]["device"] == ""
    api.executor.set_online("node-002")
    assert rows()["node-002"]["device"] == "online"
    assert 'data-field="device">online<' in browser.get(f"/ui/tasks/{task['id']}").text


def test_run_page_shows_output_and_attempts(api_factory: ApiFactory) -> None:
    api = api_factory(online=("node-001",))
    task = api.create(command="echo hello-there")
    api.wait_done(task["id"])
    b = Browser(api.client)
    b.sign_in(ADMIN)
    page = b.get(f"/ui/tasks/{task['id']}/run", params={"node": "node-001"}).text
    assert "hello-there" in page and "s-succeeded" in page
    assert page.count("<tr><td>1</td>") == 1  # one attempt
    missing = b.get(f"/ui/tasks/{task['id']}/run", params={"node": "nope"})
    assert missing.status_code == 404
    assert b.get("/ui/tasks/nope").status_code == 404


def test_device_pages(api: Api, browser: Browser) -> None:
    api.executor.update_device("node-002", os="Debian 12", group_name="lab", tags=("edge",))
    api.executor.set_online("node-002")
    first = api.create(nodeids=["node-002", "node-003"], name="first-task")
    assert first["counts"]["pending"] == 2  # node-003 stays offline
    api.create(nodeids=["node-003"], name="other-task")
    page = browser.get("/ui/devices").text
    assert "Debian 12" in page and "edge" in page and "lab" in page
    online = browser.get("/ui/devices", params={"show": "online"}).text
    assert online.count('<tr data-node="') == 1
    device = browser.get("/ui/device", params={"node": "node-003"}).text
    assert "first-task" in device and "other-task" in device
    assert browser.get("/ui/device", params={"node": "node-001"}).text.count("No runs.") == 1


# --------------------------------------------------------------------------- actions


def test_queue_form_lists_devices_and_queues_with_selectors(api: Api,
                                                            browser: Browser) -> None:
    api.executor.set_online("node-001")
    for node in ("node-001", "node-002"):
        api.executor.update_device(node, tags=("web",), group_name="lab")
    form = browser.get("/ui/queue").text
    assert "1 online of 3" in form
    assert form.count('name="nodeids"') == 3
    r = browser.post("/ui/queue", {
        "name": "rollout", "command": "systemctl restart app", "select_tags": "web",
        "select_tags_mode": "any", "select_group": "lab", "continuous": "1",
        "max_concurrent": "1", "per_minute": "10", "abort_failed_pct": "50",
        "success_exit_codes": "0, 3", "timeout": "60", "max_attempts": "2", "shell": "sh",
    })
    assert r.status_code == 303
    task_id = r.headers["location"].rsplit("/", 1)[1]
    task = api.show(task_id)
    assert task["select"]["tags"] == ["web"] and task["select"]["tags_mode"] == "any"
    assert task["continuous"] is True
    assert task["rollout"]["max_concurrent"] == 1 and task["rollout"]["per_minute"] == 10
    assert task["rollout"]["abort_failed_pct"] == 50
    assert task["success_exit_codes"] == [0, 3]
    assert task["timeout"] == 60 and task["max_attempts"] == 2 and task["shell"] == "sh"
    assert sorted(r["nodeid"] for r in task["runs"]) == ["node-001", "node-002"]
    assert "Queued task" in browser.get(r.headers["location"]).text


def test_queue_form_errors_keep_the_values(api: Api, browser: Browser) -> None:
    r = browser.post("/ui/queue", {"name": "keep-me", "command": "echo <hi>"})
    assert r.status_code == 422
    assert "nodeids: is required" in html.unescape(r.text)
    assert 'value="keep-me"' in r.text and "echo &lt;hi&gt;</textarea>" in r.text
    r = browser.post("/ui/queue", {"name": "n", "command": "c", "nodeids": "node-001",
                                   "max_concurrent": "lots"})
    assert r.status_code == 422 and "max_concurrent: must be a whole number" in r.text
    assert api.get("/task/list").json()["data"]["tasks"] == []


def test_cancel_retry_pause_resume_delete(api: Api, browser: Browser) -> None:
    task = api.create(nodeids=["node-001", "node-002"])
    tid = task["id"]
    r = browser.post(f"/ui/tasks/{tid}/cancel", {"node": "node-001"})
    assert r.headers["location"] == f"/ui/tasks/{tid}"
    assert "Cancelled 1 pending run(s)." in flash(browser.get(r.headers["location"]).text)
    states = {r["nodeid"]: r["state"] for r in api.show(tid)["runs"]}
    assert states == {"node-001": "cancelled", "node-002": "pending"}
    browser.post(f"/ui/tasks/{tid}/retry", {"node": "node-001"})
    assert api.show(tid)["runs"][0]["state"] == RunState.PENDING.value
    browser.post(f"/ui/tasks/{tid}/pause")
    page = browser.get(f"/ui/tasks/{tid}").text
    assert api.show(tid)["paused"] is True and ">Resume</button>" in page
    browser.post(f"/ui/tasks/{tid}/resume")
    assert api.show(tid)["paused"] is False
    confirm = browser.get(f"/ui/tasks/{tid}/delete").text
    assert 'action="/ui/tasks/' in confirm and "Delete the task" in confirm
    assert api.show(tid)  # the confirmation page changed nothing
    r = browser.post(f"/ui/tasks/{tid}/delete")
    assert r.headers["location"] == "/ui/tasks"
    assert api.get(f"/tasks/{tid}").status_code == 404
    nothing = browser.post(f"/ui/tasks/{tid}/retry", {"states": "failed"})
    assert nothing.status_code == 404


def test_flush_asks_first(api: Api, browser: Browser) -> None:
    api.create()
    page = browser.get("/ui/flush").text
    assert "Cancel every pending run" in page
    assert len(api.get("/task/list").json()["data"]["tasks"]) == 1
    r = browser.post("/ui/flush")
    assert "removed 1 task(s)" in flash(browser.get(r.headers["location"]).text)[0]
    assert api.get("/task/list").json()["data"]["tasks"] == []


def test_token_management(api: Api, browser: Browser) -> None:
    r = browser.post("/ui/tokens", {"name": "deploy", "scope": "write"})
    assert r.status_code == 200
    secret = re.search(r'id="new-secret" readonly value="([^"]+)"', r.text)
    assert secret is not None and secret.group(1).startswith("gr_")
    listing = browser.get("/ui/tokens").text
    assert "deploy" in listing and secret.group(1) not in listing  # shown once only
    assert api.get("/token/list", token=secret.group(1)).status_code == 403  # a real token
    assert browser.post("/ui/tokens", {"name": "deploy", "scope": "read"}).status_code == 422
    assert browser.post("/ui/tokens", {"name": "x", "scope": "root"}).status_code == 422
    user = fresh(api)
    user.sign_in(secret.group(1))
    r = browser.post("/ui/tokens/revoke", {"name": "deploy"})
    assert "Revoked token 'deploy'." in flash(browser.get(r.headers["location"]).text)
    assert "deploy" not in {t.name for t in api.store.tokens.values()}
    assert user.get("/ui/").headers["location"] == "/ui/login"  # its session ended
    builtin = browser.post("/ui/tokens/revoke", {"name": "admin"})
    assert "cannot be revoked" in flash(browser.get(builtin.headers["location"]).text)[0]


def test_sessions_are_per_app(api_factory: ApiFactory) -> None:
    # two servers (two apps) do not share sessions: a cookie of one means nothing to
    # the other
    store = InMemoryStore()
    one = create_app(Settings(executor="fake", admin_token=ADMIN), store=store,
                     executor=FakeExecutor(), announce=lambda s: None)
    two = create_app(Settings(executor="fake", admin_token=ADMIN), store=InMemoryStore(),
                     executor=FakeExecutor(), announce=lambda s: None)
    with TestClient(one) as a, TestClient(two) as b:
        a.post("/ui/login", data={"token": ADMIN})
        b.cookies.set(COOKIE, a.cookies.get(COOKIE) or "", path="/ui")
        assert b.get("/ui/", follow_redirects=False).status_code == 303
