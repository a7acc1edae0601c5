"""Helpers of the console's browser tests (``tests/browser`` and the real-lab scenario in
``tests/integration/test_console_lab.py``): a page that records its script errors, the
keyboard sign-in, and the accessibility checks run on every page a test visits.

The accessibility checks are computed in the page, on what Chromium renders:

- :func:`unlabelled`: every visible form control has a label (``<label for>``,
  ``aria-label`` or ``aria-labelledby``) and every button and link has a name;
- :func:`low_contrast`: every visible text (placeholders and form values included)
  against the colour behind it meets WCAG AA (4.5:1; 3:1 for large text);
- :func:`keyboard_walk`: Tab reaches every visible control, in turn, and each one shows
  a focus ring (an outline at least 2 px wide) contrasting 3:1 or more with the colour
  around it (WCAG 1.4.11 / 2.4.7).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, ConsoleMessage, Locator, Page, expect

__all__ = ["Watched", "assert_accessible", "keyboard_walk", "low_contrast", "run_row",
           "sign_in", "unlabelled"]


class Watched:
    """A page, and the errors its scripts reported (CSP violations are reported so)."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text} ({message.location.get('url')})")


def sign_in(page: Page, token: str) -> None:
    """Sign in with the keyboard only: the token field has the focus on arrival."""
    page.goto("/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type(token)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()


def run_row(page: Page, node: str) -> Locator:
    """The task page's row of the run on ``node``."""
    return page.locator(f'#runs tr[data-node="{node}"]')


# --------------------------------------------------------------------------- accessibility

#: the checks' code, run in the page: see a11y.js
_JS = (Path(__file__).parent / "a11y.js").read_text(encoding="utf-8")


def _call(page: Page, function: str) -> Any:
    """Run the function ``function`` of a11y.js in ``page``; its result."""
    return page.evaluate(f"() => {{\n{_JS}\nreturn {function}();\n}}")


def unlabelled(page: Page) -> list[str]:
    """Visible controls without a label, buttons and links without a name, and a page
    without ``lang`` or with other than one ``<h1>``."""
    found: list[str] = _call(page, "unlabelled")
    return found


def low_contrast(page: Page) -> list[str]:
    """Visible texts below WCAG AA contrast against the colour behind them."""
    found: list[str] = _call(page, "lowContrast")
    return found


def keyboard_walk(page: Page, limit: int = 400) -> list[str]:
    """Tab from the top of the page through every control until the focus leaves the
    page or comes back: the problems found (a control Tab never reaches, a focus ring
    missing or too faint)."""
    # Tab's starting point: a mark before everything else (not itself a Tab stop)
    page.evaluate("""() => {
        const mark = document.createElement("span");
        mark.id = "a11y-start"; mark.tabIndex = -1;
        document.body.prepend(mark); mark.focus(); }""")
    focusable: list[str] = _call(page, "focusable")
    problems: list[str] = []
    seen: list[str] = []
    reached: set[int] = set()
    for _ in range(limit):
        page.keyboard.press("Tab")
        info: dict[str, Any] | None = _call(page, "focused")
        if info is None or info["id"] in seen:
            break
        seen.append(info["id"])
        if info["stop"] is not None:
            reached.add(int(info["stop"]))
        if info["style"] == "none" or info["width"] < 2 or info["ratio"] < 3:
            problems.append(f"focus ring of {info['what']}: {info['style']} "
                            f"{info['width']}px, contrast {info['ratio']:.2f} (need 2px, 3:1)")
    else:
        problems.append(f"Tab went on past {limit} stops")
    page.evaluate("() => document.querySelectorAll('#a11y-start').forEach((e) => e.remove())")
    page.evaluate("() => document.querySelectorAll('[data-a11y-seen], [data-a11y-stop]')"
                  ".forEach((e) => { e.removeAttribute('data-a11y-seen'); "
                  "e.removeAttribute('data-a11y-stop'); })")
    missed = [what for i, what in enumerate(focusable) if i not in reached]
    if missed:
        problems.append(f"Tab never reached: {missed}")
    return problems


def assert_accessible(page: Page, *, keyboard: bool = True) -> None:
    """Every check above on the page shown (``keyboard=False``: not the Tab walk)."""
    problems = unlabelled(page) + low_contrast(page)
    if keyboard:
        problems += keyboard_walk(page)
    assert problems == [], f"{page.url}:\n" + "\n".join(problems)
