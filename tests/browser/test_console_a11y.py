"""Accessibility basics of every console page, as Chromium renders them (see
``pages.py``): labels and names, WCAG AA text contrast, a visible focus ring on every
control Tab reaches, and Tab reaching every control."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ADMIN
from tests.browser.pages import (
    Watched,
    assert_accessible,
    keyboard_walk,
    low_contrast,
    sign_in,
    unlabelled,
)
from tests.serverproc import ServerProcess


@pytest.fixture
def tab(chromium: Any, server: ServerProcess) -> Iterator[Watched]:
    context = chromium.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    watched = Watched(context)
    yield watched
    context.close()
    assert watched.errors == [], watched.errors


def test_every_page_is_labelled_contrasted_and_keyboard_usable(tab: Watched,
                                                                server: ServerProcess) -> None:
    r = httpx.post(server.url + "/task/create", timeout=10,
                   headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"details": {"name": "a11y", "command": "uptime",
                                     "nodeids": ["node//web-1", "node//pi-3"]}})
    assert r.status_code == 200, r.text
    task = r.json()["data"]["id"]
    page = tab.page
    page.goto("/ui/login")
    assert_accessible(page)
    sign_in(page, ADMIN)
    for path, heading in (
        ("/ui/", "Overview"),
        ("/ui/tasks", "Tasks"),
        (f"/ui/tasks/{task}", "Task a11y"),
        (f"/ui/tasks/{task}/run?node=node%2F%2Fweb-1", "Run on web-1"),
        (f"/ui/tasks/{task}/run?node=node%2F%2Fpi-3", "Run on pi-3"),
        ("/ui/devices", "Devices"),
        ("/ui/device?node=node%2F%2Fpi-3", "Device pi-3"),
        ("/ui/queue", "Queue a command"),
        ("/ui/tokens", "API tokens"),
        ("/ui/audit", "Audit log"),
        ("/ui/flush", "Flush the queue"),
        (f"/ui/tasks/{task}/delete", "Delete a task"),
        ("/ui/tasks/no-such-task", "Not found"),
    ):
        page.goto(path)
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        # details opened, so that what they hold is checked too
        page.evaluate("() => document.querySelectorAll('details')"
                      ".forEach((d) => { d.open = true; })")
        assert_accessible(page)
    # the one page answered 404 above is the only error the browser reported
    assert len(tab.errors) == 1 and "404" in tab.errors[0], tab.errors
    tab.errors.clear()


def test_a_form_error_is_announced_and_tied_to_its_form(tab: Watched) -> None:
    page = tab.page
    sign_in(page, ADMIN)
    page.goto("/ui/queue")
    page.get_by_label("Name", exact=True).fill("no devices")
    page.get_by_label("Command", exact=True).fill("true")
    page.get_by_role("button", name="Queue", exact=True).click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("nodeids")
    assert_accessible(page)
    assert page.locator("form.stack").get_attribute("aria-describedby") == "queue-error"
    assert len(tab.errors) == 1 and "422" in tab.errors[0], tab.errors
    tab.errors.clear()


BAD_PAGE = """<!doctype html><html><head><style>
body { background: #fff; color: #111; }
.faint { color: #aaa; }
.dark { background: #222; } .dark span { color: #555; }
#ring:focus-visible { outline: 3px solid #ffd; }
#none:focus { outline: none; }
a { display: inline-block; width: 20px; height: 20px; }
input::placeholder { color: #ccc; }
</style></head><body>
<h1>One</h1><h1>Two</h1>
<p class="faint">faint text</p>
<div class="dark"><span>dark on dark</span></div>
<input id="bare" placeholder="pale hint">
<button id="ring">faint ring</button>
<button id="none">no ring</button>
<input id="trap" aria-label="a focus trap">
<button id="after">after the trap</button>
<a href="#x"></a>
<script>
const trap = document.getElementById("trap");
trap.addEventListener("keydown", (e) => { if (e.key === "Tab") { e.preventDefault(); } });
</script>
</body></html>"""


def test_the_checks_find_what_they_look_for(chromium: Any) -> None:
    """The checks above can fail: on a page made of the faults they look for, each is
    reported."""
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.set_content(BAD_PAGE)
        assert sorted(unlabelled(page)) == [
            "no label: input#bare name=", "no lang on <html>", "no name: a",
            "not exactly one <h1>"]
        contrast = low_contrast(page)
        assert len(contrast) == 3, contrast
        assert any('"faint text"' in c and "#aaaaaa on #ffffff" in c for c in contrast)
        assert any('"dark on dark"' in c and "#555555 on #222222" in c for c in contrast)
        assert any('placeholder "pale hint"' in c for c in contrast)
        walk = keyboard_walk(page)
        assert any("button#ring" in p and "contrast 1.0" in p for p in walk), walk
        assert any("button#none" in p and "none" in p for p in walk), walk
        assert any("Tab never reached" in p and "button#after" in p for p in walk), walk
    finally:
        context.close()
