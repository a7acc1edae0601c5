"""The operator console in a real browser (see conftest.py): sign in with the keyboard,
queue a command for an offline device, cancel and retry it from the page, watch a page
update live without reloading, and a read token that sees no write controls (and whose
writes the server refuses anyway). Every page is checked for script errors, CSP
violations included; screenshots of the main pages land in artifacts/screenshots/.

Waits are Playwright's: on selectors and conditions (``expect``), never fixed sleeps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ADMIN
from tests.browser.pages import Watched, run_row, sign_in
from tests.serverproc import ServerProcess

#: the page script follows the event stream (or polls every 2 s when it cannot): a
#: live change shows within this
LIVE_TIMEOUT_MS = 10_000


@pytest.fixture
def tab(chromium: Any, server: ServerProcess) -> Iterator[Watched]:
    context = chromium.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    watched = Watched(context)
    yield watched
    context.close()
    assert watched.errors == [], watched.errors


def api(server: ServerProcess, method: str, path: str, token: str = ADMIN,
        json: Any = None) -> dict[str, Any]:
    r = httpx.request(method, server.url + path, json=json,
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def test_sign_in_and_out(tab: Watched, screenshots: Path) -> None:
    page = tab.page
    page.goto("/ui/login")
    page.screenshot(path=str(screenshots / "login.png"))
    sign_in(page, ADMIN)
    expect(page.get_by_text("Signed in as")).to_contain_text("admin")
    cookie = next(c for c in tab.context.cookies() if c["name"] == "gr_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert ADMIN not in cookie["value"]
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto("/ui/tasks")
    expect(page).to_have_url(re.compile(r"/ui/login$"))


def test_queue_for_an_offline_device_then_cancel_and_retry(tab: Watched,
                                                           screenshots: Path) -> None:
    page = tab.page
    sign_in(page, ADMIN)
    page.get_by_role("link", name="Queue a command").click()
    expect(page.get_by_role("heading", name="Queue a command")).to_be_visible()
    page.get_by_label("Name", exact=True).fill("patch laptop")
    page.get_by_label("Command", exact=True).fill("echo '<b>not bold</b>'")
    laptop = page.get_by_role("checkbox", name=re.compile(r"^laptop-7 offline"))
    laptop.check()
    page.screenshot(path=str(screenshots / "queue.png"), full_page=True)
    page.get_by_role("button", name="Queue", exact=True).click()

    expect(page.get_by_role("heading", name="Task patch laptop")).to_be_visible()
    expect(page.get_by_role("status").first).to_have_text("Queued task 'patch laptop'.")
    row = run_row(page, "node//laptop-7")
    expect(row.locator('[data-field="state"]')).to_have_text("pending")
    page.screenshot(path=str(screenshots / "task.png"), full_page=True)

    page.get_by_role("button", name="Cancel pending runs").click()
    expect(page.get_by_role("status").first).to_have_text("Cancelled 1 pending run(s).")
    expect(row.locator('[data-field="state"]')).to_have_text("cancelled")

    page.get_by_role("checkbox", name="cancelled").check()
    page.get_by_role("button", name="Retry", exact=True).click()
    expect(page.get_by_role("status").first).to_have_text("Sent 1 run(s) again.")
    expect(row.locator('[data-field="state"]')).to_have_text("pending")

    row.get_by_role("link", name=re.compile("Output and attempts")).click()
    expect(page.get_by_role("heading", name="Run on laptop-7")).to_be_visible()
    expect(page.locator(".kv")).to_contain_text("pending")
    # cancelled before it was ever sent: no attempt yet
    expect(page.locator("table.grid tbody tr")).to_have_text("Not sent yet.")
    page.screenshot(path=str(screenshots / "run.png"), full_page=True)


def test_the_task_page_updates_live_without_reloading(tab: Watched,
                                                      server: ServerProcess) -> None:
    page = tab.page
    sign_in(page, ADMIN)
    task = api(server, "POST", "/task/create", json={"details": {
        "name": "live one", "command": "uptime", "nodeids": ["node//pi-3", "node//laptop-7"]}})
    page.goto(f"/ui/tasks/{task['id']}")
    row = run_row(page, "node//pi-3")
    expect(row.locator('[data-field="state"]')).to_have_text("pending")
    page.evaluate("window.__sameDocument = true")
    # elsewhere (the API), an operator cancels one run: the page shows it by itself
    api(server, "POST", f"/tasks/{task['id']}/cancel", json={"nodeids": ["node//pi-3"]})
    expect(row.locator('[data-field="state"]')).to_have_text("cancelled",
                                                             timeout=LIVE_TIMEOUT_MS)
    expect(page.locator('[data-count="cancelled"]')).to_have_text("1")
    expect(page.locator("#live-note")).to_contain_text("live")
    expect(run_row(page, "node//laptop-7").locator('[data-field="state"]')).to_have_text(
        "pending")
    assert page.evaluate("window.__sameDocument") is True  # not reloaded


def test_the_task_page_follows_the_event_stream(tab: Watched, server: ServerProcess) -> None:
    """The page listens to /ui/events (EventSource, signed in by the session cookie):
    a change made elsewhere shows without a reload, and the page does not poll."""
    page = tab.page
    sign_in(page, ADMIN)
    task = api(server, "POST", "/task/create", json={"details": {
        "name": "streamed", "command": "uptime", "nodeids": ["node//pi-3", "node//laptop-7"]}})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"/ui/tasks/{task['id']}")
    expect(page.locator("#live")).to_have_attribute("data-live-source", "events")
    # the stream opened: the page caught up once (a fetch of its state), and says so
    expect(page.locator("#live-note")).to_have_text(re.compile(r"^live, updated"))
    page.evaluate("window.__sameDocument = true")
    api(server, "POST", f"/tasks/{task['id']}/cancel", json={"nodeids": ["node//laptop-7"]})
    row = run_row(page, "node//laptop-7")
    expect(row.locator('[data-field="state"]')).to_have_text("cancelled",
                                                             timeout=LIVE_TIMEOUT_MS)
    expect(page.locator('[data-count="cancelled"]')).to_have_text("1")
    assert page.evaluate("window.__sameDocument") is True  # not reloaded
    streams = [u for u in requests if "/ui/events?" in u]
    assert streams == [f"{server.url}/ui/events?task={task['id']}"]  # no token in it
    expect(page.locator("#live")).to_have_attribute("data-live-source", "events")


def test_the_task_page_polls_when_the_event_stream_is_refused(tab: Watched,
                                                              server: ServerProcess) -> None:
    page = tab.page
    sign_in(page, ADMIN)
    task = api(server, "POST", "/task/create", json={"details": {
        "name": "polled", "command": "uptime", "nodeids": ["node//pi-3"]}})
    # a proxy, or a server at its stream limit, refuses the stream
    page.route("**/ui/events?*", lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"status":503}'))
    page.goto(f"/ui/tasks/{task['id']}")
    expect(page.locator("#live")).to_have_attribute("data-live-source", "poll")
    api(server, "POST", f"/tasks/{task['id']}/cancel")
    expect(run_row(page, "node//pi-3").locator('[data-field="state"]')).to_have_text(
        "cancelled", timeout=LIVE_TIMEOUT_MS)
    expect(page.locator("#live-note")).to_contain_text("polling")
    tab.errors[:] = [e for e in tab.errors if "503" not in e]  # the refusal, logged


def test_a_read_token_sees_no_write_controls(chromium: Any, server: ServerProcess,
                                             tab: Watched) -> None:
    reader = api(server, "POST", "/token/create",
                 json={"details": {"name": "viewer", "scope": "read"}})["token"]
    task = api(server, "POST", "/task/create", json={"details": {
        "name": "look only", "command": "uptime", "nodeids": ["node//laptop-7"]}})
    page = tab.page
    sign_in(page, reader)
    expect(page.get_by_text("Signed in as")).to_contain_text("viewer")
    for path in ("/ui/", "/ui/tasks", f"/ui/tasks/{task['id']}", "/ui/devices"):
        page.goto(path)
        expect(page.get_by_role("link", name="Queue a command")).to_have_count(0)
        expect(page.get_by_role("link", name="Tokens")).to_have_count(0)
        for name in ("Cancel pending runs", "Pause", "Retry", "Flush"):
            expect(page.get_by_role("button", name=name)).to_have_count(0)
        expect(page.locator("form[method=post]")).to_have_count(1)  # sign-out only
    # the server refuses its writes anyway, even with the session's CSRF token
    page.goto(f"/ui/tasks/{task['id']}")
    status = page.evaluate("""async (url) => {
        const csrf = document.querySelector('input[name=csrf]').value;
        const r = await fetch(url, {method: 'POST', headers: {'X-CSRF-Token': csrf}});
        return r.status;
    }""", f"/ui/tasks/{task['id']}/cancel")
    assert status == 403
    shown = api(server, "GET", f"/tasks/{task['id']}")
    assert shown["runs"][0]["state"] == "pending"
    page.goto("/ui/queue")
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    # the two refusals above are the only errors the browser reported
    refused = [e for e in tab.errors if "status of 403" in e]
    assert len(refused) == 2, tab.errors
    tab.errors = [e for e in tab.errors if e not in refused]


def test_screenshots_of_the_main_pages(tab: Watched, server: ServerProcess,
                                       screenshots: Path) -> None:
    api(server, "POST", "/task/create", json={"details": {
        "name": "restart web", "command": "systemctl restart nginx",
        "select": {"tags": ["web"]}, "rollout": {"max_concurrent": 1}}})
    page = tab.page
    sign_in(page, ADMIN)
    for name, path, heading in (
        ("overview", "/ui/", "Overview"),
        ("tasks", "/ui/tasks", "Tasks"),
        ("devices", "/ui/devices", "Devices"),
        ("device", "/ui/device?node=node%2F%2Fweb-1", "Device web-1"),
        ("tokens", "/ui/tokens", "API tokens"),
        ("flush", "/ui/flush", "Flush the queue"),
    ):
        page.goto(path)
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
    page.goto("/ui/device?node=node%2F%2Fweb-1")
    expect(page.locator("#timeline")).to_contain_text("restart web")
    expect(page.locator("#timeline")).to_contain_text("succeeded")
