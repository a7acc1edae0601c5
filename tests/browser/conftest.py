"""Browser tests of the operator console: Playwright for Python driving the OS's
Chromium (Debian's ``chromium`` package; Playwright's own browser download is not used),
headless, against a real ``ghostrunner serve``.

Chromium is found at ``$GHOSTRUNNER_CHROMIUM`` or ``/usr/bin/chromium``; when it is
missing these tests FAIL (never skip) saying what to install. ``python3 noxfile.py``
installs it (``apt-get install -y chromium``) when it runs as root.

Screenshots of the main pages are saved under ``artifacts/screenshots/`` (gitignored).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http.conftest import served
from tests.serverproc import REPO, ServerProcess

CHROMIUM = Path(os.environ.get("GHOSTRUNNER_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO / "artifacts" / "screenshots"
ADMIN = "browser-admin-token-0123456789abcdef"

#: the fake executor's devices: two online, two offline (the fake never changes them)
CONFIG = """executor = "fake"

[[fake.devices]]
nodeid = "node//web-1"
name = "web-1"
online = true
group = "lab"
tags = ["web"]
os = "Debian 12"

[[fake.devices]]
nodeid = "node//web-2"
name = "web-2"
online = true
group = "lab"
tags = ["web"]
os = "Debian 12"

[[fake.devices]]
nodeid = "node//laptop-7"
name = "laptop-7"
online = false
group = "office"
tags = ["laptop"]
os = "Windows 11"

[[fake.devices]]
nodeid = "node//pi-3"
name = "pi-3"
online = false
group = "lab"
tags = ["iot"]
os = "Raspberry Pi OS"
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


@contextlib.contextmanager
def launched_chromium() -> Iterator[Any]:
    """A headless Chromium (the OS's), closed on leaving.

    Playwright's sync API keeps an asyncio event loop running in the thread while it is
    open, so every ``asyncio.run`` after it would fail: it must be closed before the
    rest of the suite runs (scope it to a package or a module, never the session)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"the browser tests need Chromium at {CHROMIUM}: install Debian's package "
            "(apt-get install -y chromium; python3 noxfile.py does it when run as root) "
            "or set GHOSTRUNNER_CHROMIUM to a Chromium executable", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            # root in CI: Chromium's sandbox needs user namespaces it may not have
            args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="package")
def chromium() -> Iterator[Any]:
    """A headless Chromium for the browser tests (this package only: see
    :func:`launched_chromium`)."""
    with launched_chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real ``ghostrunner serve`` (fake executor, SQLite) for a test module."""
    with served(tmp_path_factory.mktemp("console"), CONFIG, ADMIN) as proc:
        yield proc


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
