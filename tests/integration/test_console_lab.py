"""The operator console in a real Chromium, against a real ``ghostrunner serve`` driving the
real MeshCentral lab: the scenario of the console's issue, end to end.

1. Sign in with a ``write`` token, queue a command from the console for a device whose
   agent is stopped (the device picker shows it offline): the run shows ``pending``.
2. Start the agent: the run goes pending -> dispatched -> succeeded in the page, without
   a reload (a MutationObserver records every state the row showed). The command waits
   for a gate file, so ``dispatched`` lasts until the test has seen it: no timing luck,
   whatever the page's source of changes (polling, or an event stream).
3. With the agent stopped again: cancel a pending run from its page, then retry it
   (cancelled) from its page, each confirmed in the page and through the API; the agent
   starts and the retried run succeeds, live.
4. A ``read`` token on the lab's pages: no write controls on any page (run and device
   pages too), and its session's writes are refused by the server (403, nothing changes).

Every page visited is checked for accessibility (``tests/browser/pages.py``) and script
errors; screenshots of the main pages in the lab's state go to
``artifacts/screenshots/lab-*.png``. Waits are on the page's DOM or on the API's state,
each with a deadline; no fixed sleeps.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from ghostrunner.lab import Agent, MeshLab
from tests.browser.conftest import SCREENSHOTS, launched_chromium
from tests.browser.pages import Watched, assert_accessible, run_row, sign_in
from tests.integration.faultkit import wait_for
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.browser

ADMIN = "console-lab-admin-token-0123456789abcdef"
AGENT = "console-lab"
#: from an agent's start to its run shown dispatched: the agent connects, MeshCentral
#: tells the server, the server dispatches, the page learns it (polling: every 2 s)
LIVE_MS = 60_000
#: the API's view of a device, after the lab's
SEEN_S = 60.0


def config(lab: MeshLab) -> str:
    # the MeshCentral user and password come from the environment (see server())
    return (
        'executor = "meshcentral"\n'
        "[meshcentral]\n"
        f'url = "{lab.url}"\n'
        "ignore_ssl = true\n"
        f'group_id = "{lab.group_id}"\n'
    )


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """This module's Chromium (closed with the module: see ``launched_chromium``)."""
    with launched_chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def server(mesh_lab: MeshLab, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """A real ``ghostrunner serve`` on the lab (MeshCentral executor, SQLite)."""
    proc = ServerProcess(tmp_path_factory.mktemp("console-lab"), config(mesh_lab), env={
        "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
        "GHOSTRUNNER_MESHCENTRAL_USER": mesh_lab.admin_user,
        "GHOSTRUNNER_MESHCENTRAL_PASSWORD": mesh_lab.admin_password,
    })
    proc.start(timeout=120)
    try:
        wait_for(lambda: bool(info(proc)["executor_connected"]), SEEN_S,
                 "the server connected to MeshCentral", proc.log)
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, proc.log()


@pytest.fixture
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture
def browse(chromium: Any, server: ServerProcess) -> Iterator[Callable[[], Watched]]:
    """``browse()`` -> a new browser context's page (its own cookies); after the test,
    none of them reported a script error."""
    opened: list[Watched] = []

    def new() -> Watched:
        context = chromium.new_context(base_url=server.url,
                                       viewport={"width": 1280, "height": 900})
        opened.append(Watched(context))
        return opened[-1]

    yield new
    for watched in opened:
        watched.context.close()
    assert [e for w in opened for e in w.errors] == []


# --------------------------------------------------------------------------- helpers


def info(server: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = server.call("GET", "/").json()["data"]
    return data


def api(server: ServerProcess, method: str, path: str, token: str = ADMIN,
        json: Any = None) -> dict[str, Any]:
    r = server.call(method, path, token, json=json)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def api_run(server: ServerProcess, task_id: str, node: str) -> dict[str, Any]:
    """The run of ``task_id`` on ``node`` as ``GET /tasks/{id}`` shows it (with output)."""
    r = httpx.get(f"{server.url}/tasks/{task_id}", params={"output": "true"}, timeout=10,
                  headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return next(run for run in r.json()["data"]["runs"] if run["nodeid"] == node)


def server_sees(server: ServerProcess, agent: Agent, *, online: bool) -> None:
    """Wait until the server's executor shows ``agent`` online (or offline), by its name
    (as the console's pages show it: a device that enrolled while the server logged in
    to MeshCentral is known by its node id until the server's next snapshot)."""
    key = "online_devices" if online else "offline_devices"

    def seen() -> bool:
        devices = api(server, "GET", "/devices")[key]
        return any(d["nodeid"] == agent.node_id and d["name"] == agent.name
                   for d in devices)

    wait_for(seen, SEEN_S, f"the server sees {agent.name} {'online' if online else 'offline'}"
             " under its name", server.log)


def stopped_agent(agent_factory: Callable[..., Agent], mesh_lab: MeshLab,
                  server: ServerProcess) -> Agent:
    """The lab's agent for this module, stopped, and offline for the server too."""
    agent = agent_factory(AGENT)
    agent.stop()
    mesh_lab.wait_connected([agent], connected=False)
    server_sees(server, agent, online=False)
    return agent


def state_cell(page: Page, node: str) -> Locator:
    return run_row(page, node).locator('[data-field="state"]')


def watch_states(page: Page, node: str) -> None:
    """Record in the page every state the row of ``node`` shows from now on, and mark
    the document (a reload would lose both)."""
    page.evaluate("""(node) => {
        const sel = `#runs tr[data-node="${CSS.escape(node)}"] [data-field="state"]`;
        window.__states = [];
        window.__sameDocument = true;
        const read = () => {
            const cell = document.querySelector(sel);
            const text = cell ? cell.textContent.trim() : "(no row)";
            if (window.__states[window.__states.length - 1] !== text) {
                window.__states.push(text);
            }
        };
        read();
        new MutationObserver(read).observe(document.body,
            {subtree: true, childList: true, characterData: true});
    }""", node)


def states_seen(page: Page) -> list[str]:
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    seen: list[str] = page.evaluate("window.__states")
    return seen


def shot(page: Page, screenshots: Path, name: str) -> None:
    page.screenshot(path=str(screenshots / f"lab-{name}.png"), full_page=True)


def queue_from_console(page: Page, name: str, command: str, device: str) -> str:
    """Queue ``command`` for the device named ``device`` with the console's form (the
    picker must show it offline); the new task's id."""
    page.get_by_role("link", name="Queue a command").first.click()
    expect(page.get_by_role("heading", name="Queue a command")).to_be_visible()
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Command", exact=True).fill(command)
    page.get_by_role("checkbox", name=re.compile(rf"^{re.escape(device)} offline")).check()
    page.get_by_role("button", name="Queue", exact=True).click()
    expect(page.get_by_role("heading", name=f"Task {name}")).to_be_visible()
    expect(page.get_by_role("status").first).to_have_text(f"Queued task {name!r}.")
    found = re.search(r"/ui/tasks/([^/?#]+)$", page.url)
    assert found, page.url
    return found.group(1)


# --------------------------------------------------------------------------- scenarios


def test_queue_for_an_offline_lab_device_watch_it_run_cancel_and_retry(
    browse: Callable[[], Watched], server: ServerProcess, mesh_lab: MeshLab,
    agent_factory: Callable[..., Agent], tmp_path: Path, screenshots: Path,
) -> None:
    began = time.monotonic()
    agent = stopped_agent(agent_factory, mesh_lab, server)
    node = agent.node_id
    operator = api(server, "POST", "/token/create",
                   json={"details": {"name": "operator", "scope": "write"}})["token"]
    page = browse().page
    sign_in(page, operator)
    expect(page.get_by_text("Signed in as")).to_contain_text("operator (write)")
    expect(page.locator("#connection")).to_have_text("connected")

    # 1. queue for the offline device: pending
    gate = tmp_path / "gate"
    command = (f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.1; done; "
               "echo patched by the console")
    page.get_by_role("link", name="Queue a command").first.click()
    picker = page.get_by_role("checkbox", name=re.compile(rf"^{AGENT} offline"))
    try:
        expect(picker).to_have_count(1)
    except AssertionError as exc:  # what the page and the server showed instead
        raise AssertionError(
            f"{exc}\npage {page.url}: {page.locator('.picker label').all_inner_texts()}\n"
            f"server: {api(server, 'GET', '/devices')}") from None
    assert_accessible(page)
    shot(page, screenshots, "queue")
    page.go_back()
    task_id = queue_from_console(page, "lab patch", command, AGENT)
    expect(state_cell(page, node)).to_have_text("pending")
    device_mark = run_row(page, node).locator('[data-field="device"]')
    expect(device_mark).to_have_text("offline")
    assert api_run(server, task_id, node)["state"] == "pending"
    shot(page, screenshots, "task-pending")

    # 2. the agent starts: pending -> dispatched -> succeeded, live, in the same document
    watch_states(page, node)
    agent.start()
    expect(state_cell(page, node)).to_have_text("dispatched", timeout=LIVE_MS)
    expect(page.locator("#task-status")).to_have_text("running")
    expect(device_mark).to_have_text("online")  # the row says so too, live
    assert api_run(server, task_id, node)["state"] == "dispatched"
    shot(page, screenshots, "task-dispatched")
    gate.touch()  # the command may end now
    expect(state_cell(page, node)).to_have_text("succeeded", timeout=LIVE_MS)
    row = run_row(page, node)
    expect(row.locator('[data-field="exit_code"]')).to_have_text("0")
    expect(row.locator('[data-field="attempts"]')).to_have_text("1")
    expect(page.locator("#task-status")).to_have_text("succeeded")
    expect(page.locator('[data-count="succeeded"]')).to_have_text("1")
    assert states_seen(page) == ["pending", "dispatched", "succeeded"]
    run = api_run(server, task_id, node)
    assert (run["state"], run["exit_code"]) == ("succeeded", 0)
    assert "patched by the console" in run["output"]
    assert_accessible(page)
    shot(page, screenshots, "task")
    row.get_by_role("link", name=f"Output and attempts on {AGENT}").click()
    expect(page.get_by_role("heading", name=f"Run on {AGENT}")).to_be_visible()
    expect(page.get_by_label("Output", exact=True)).to_contain_text("patched by the console")
    # a succeeded run offers neither cancel nor retry
    expect(page.get_by_role("button", name=re.compile("this run"))).to_have_count(0)
    assert_accessible(page)
    shot(page, screenshots, "run")

    # 3. offline again: cancel a pending run from its page, retry it from its page
    agent.stop()
    mesh_lab.wait_connected([agent], connected=False)
    server_sees(server, agent, online=False)
    second = queue_from_console(page, "lab again", "echo second run", AGENT)
    expect(state_cell(page, node)).to_have_text("pending")
    run_row(page, node).get_by_role("link", name=re.compile("Output and attempts")).click()
    expect(page.get_by_role("heading", name=f"Run on {AGENT}")).to_be_visible()
    expect(page.locator(".kv")).to_contain_text("offline")
    expect(page.get_by_role("button", name="Retry this run")).to_have_count(0)
    page.get_by_role("button", name="Cancel this run").click()
    expect(page.get_by_role("status").first).to_have_text("Cancelled 1 pending run(s).")
    expect(state_cell(page, node)).to_have_text("cancelled")
    assert api_run(server, second, node)["state"] == "cancelled"
    run_row(page, node).get_by_role("link", name=re.compile("Output and attempts")).click()
    expect(page.get_by_role("button", name="Cancel this run")).to_have_count(0)
    page.get_by_role("button", name="Retry this run").click()
    expect(page.get_by_role("status").first).to_have_text("Sent 1 run(s) again.")
    expect(state_cell(page, node)).to_have_text("pending")
    assert api_run(server, second, node)["state"] == "pending"
    # the retried run really runs when its device comes back, shown live
    watch_states(page, node)
    agent.start()
    expect(state_cell(page, node)).to_have_text("succeeded", timeout=LIVE_MS)
    assert states_seen(page)[0] == "pending" and states_seen(page)[-1] == "succeeded"
    run = api_run(server, second, node)
    assert (run["state"], run["attempts"]) == ("succeeded", 1)
    assert "second run" in run["output"]

    # the other main pages, in the lab's state
    for name, path, heading in (
        ("overview", "/ui/", "Overview"),
        ("tasks", "/ui/tasks", "Tasks"),
        ("devices", "/ui/devices", "Devices"),
        ("device", f"/ui/device?node={quote(node, safe='')}", f"Device {AGENT}"),
    ):
        page.goto(path)
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        assert_accessible(page)
        shot(page, screenshots, name)
    expect(page.locator("#timeline")).to_contain_text("lab patch")
    expect(page.locator("#timeline")).to_contain_text("lab again")
    print(f"\nconsole lab scenario: {time.monotonic() - began:.1f} s")


def test_a_read_token_sees_no_write_controls_on_the_lab(
    browse: Callable[[], Watched], server: ServerProcess, mesh_lab: MeshLab,
    agent_factory: Callable[..., Agent], screenshots: Path,
) -> None:
    agent = stopped_agent(agent_factory, mesh_lab, server)
    node = agent.node_id
    reader = api(server, "POST", "/token/create",
                 json={"details": {"name": "watcher", "scope": "read"}})["token"]
    task = api(server, "POST", "/task/create", json={"details": {
        "name": "lab look", "command": "uptime", "nodeids": [node]}})["id"]
    done = api(server, "POST", "/task/create", json={"details": {
        "name": "lab done", "command": "uptime", "nodeids": [node]}})["id"]
    api(server, "POST", f"/tasks/{done}/cancel", json={"nodeids": [node]})
    tasks_before = api(server, "GET", "/task/list")["tasks"]
    watched = browse()
    page = watched.page
    sign_in(page, reader)
    expect(page.get_by_text("Signed in as")).to_contain_text("watcher (read)")
    quoted = quote(node, safe="")
    # a writer would see: cancel (pending run), retry (cancelled run), queue for device
    for path in (f"/ui/tasks/{task}/run?node={quoted}", f"/ui/tasks/{done}/run?node={quoted}",
                 f"/ui/device?node={quoted}", f"/ui/tasks/{done}", "/ui/devices"):
        page.goto(path)
        expect(page.get_by_role("heading", level=1)).to_be_visible()
        expect(page.get_by_role("button", name=re.compile(
            "Cancel|Retry|Pause|Resume|Flush|Delete|Queue"))).to_have_count(0)
        expect(page.get_by_role("link", name=re.compile(
            "Queue|Delete|Flush|Tokens|Audit"))).to_have_count(0)
        expect(page.locator("form[method=post]")).to_have_count(1)  # sign-out only
        assert_accessible(page, keyboard=False)
    shot(page, screenshots, "device-read")
    # its session's writes, with its CSRF token, from the console's own origin: 403
    csrf = page.locator("input[name=csrf]").input_value()
    refused = page.evaluate("""async ([csrf, posts]) => {
        const out = [];
        for (const [url, body] of posts) {
            const form = new URLSearchParams({csrf: csrf, ...body});
            const r = await fetch(url, {method: "POST", body: form});
            out.push(r.status);
        }
        return out;
    }""", [csrf, [
        ["/ui/queue", {"name": "sneaky", "command": "id", "nodeids": node}],
        [f"/ui/tasks/{done}/retry", {"node": node}],
        [f"/ui/tasks/{task}/cancel", {"node": node}],
        [f"/ui/tasks/{task}/pause", {}],
        ["/ui/tokens", {"name": "escalate", "scope": "admin"}],
    ]])
    assert refused == [403] * 5
    assert api_run(server, task, node)["state"] == "pending"
    assert api_run(server, done, node)["state"] == "cancelled"
    assert api(server, "GET", "/task/list")["tasks"] == tasks_before
    names = {t["name"] for t in api(server, "GET", "/token/list")["tokens"]}
    assert "escalate" not in names
    # and the audit log names the refused writes, with the token that tried
    audit = api(server, "GET", "/audit?token=watcher&status=4xx")["entries"]
    assert len(audit) == 5, audit
    assert {e["status"] for e in audit} == {403}
    # the browser reported the five refusals, nothing else
    assert len(watched.errors) == 5 and all("403" in e for e in watched.errors), \
        watched.errors
    watched.errors.clear()
