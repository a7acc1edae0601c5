"""The operator CLI's safety (issue #12): the token never follows a redirect to another
origin, and what the server sends never reaches the terminal as control characters."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ghostrunner_http._client import ApiClient, ApiFailure, Unreachable
from ghostrunner_http.cli import main
from tests.http.conftest import ServerProcess, as_operator, served
from tests.http.test_http_cli import run

TOKEN = "cli-security-token-0123456789"

# --------------------------------------------------------------------------- redirects


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``server.answer`` (status, headers, body), and
    records each request's method, path and Authorization header."""

    server: Loopback

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append(
            (self.command, self.path, self.headers.get("Authorization")))
        status, headers, body = self.server.answer
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class Loopback(http.server.ThreadingHTTPServer):
    def __init__(self, answer: tuple[int, dict[str, str], bytes]) -> None:
        super().__init__(("127.0.0.1", 0), Recorder)
        self.answer = answer
        self.seen: list[tuple[str, str, str | None]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def loopback() -> Iterator[Any]:
    """``loopback(answer)`` -> a started :class:`Loopback` (stopped after the test)."""
    started: list[tuple[Loopback, threading.Thread]] = []

    def start(answer: tuple[int, dict[str, str], bytes]) -> Loopback:
        server = Loopback(answer)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


ENVELOPE = json.dumps({"data": {"total_devices": 0}}).encode()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_token_is_not_sent_where_a_redirect_points(loopback: Any, status: int) -> None:
    """A server (or a proxy in front of it) answering 30x with another origin: before,
    urllib followed and sent the Authorization header there too."""
    elsewhere = loopback((200, {"Content-Type": "application/json"}, ENVELOPE))
    redirecting = loopback((status, {"Location": f"{elsewhere.url}/devices"}, b""))
    client = ApiClient(redirecting.url, TOKEN)
    with pytest.raises(ApiFailure) as caught:
        client.call("GET", "/devices")
    assert caught.value.status == status
    assert f"redirected to {elsewhere.url}/devices" in caught.value.message
    assert redirecting.seen == [("GET", "/devices", f"Bearer {TOKEN}")]
    assert elsewhere.seen == []  # not followed at all: no token, no request


def test_a_redirect_is_an_error_of_the_cli_naming_the_location(
    loopback: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = loopback((200, {"Content-Type": "application/json"}, ENVELOPE))
    redirecting = loopback((307, {"Location": f"{elsewhere.url}/devices"}, b""))
    code = main(["devices", "--url", redirecting.url, "--token", TOKEN], out=io.StringIO())
    assert code == 3
    err = capsys.readouterr().err
    assert f"error 307: the server redirected to {elsewhere.url}/devices" in err
    assert TOKEN not in err
    assert elsewhere.seen == []


def test_a_same_origin_redirect_is_not_followed_either(loopback: Any) -> None:
    server = loopback((308, {"Location": "/somewhere/else"}, b""))
    with pytest.raises(ApiFailure, match=r"redirected to http://127\.0\.0\.1:\d+/somewhere/else"):
        ApiClient(server.url, TOKEN).call("GET", "/devices")
    assert len(server.seen) == 1


def test_a_password_in_the_server_url_is_not_printed() -> None:
    with pytest.raises(Unreachable) as caught:
        ApiClient("http://ops:pw-in-the-url-99@127.0.0.1:1", TOKEN, timeout=5).call(
            "GET", "/devices")
    assert "pw-in-the-url-99" not in str(caught.value)
    assert "http://ops:[REDACTED]@127.0.0.1:1" in str(caught.value)


# --------------------------------------------------------------------------- control chars

#: What a hostile task, device or server could send: clear the screen, a carriage
#: return that rewrites the line, the bell, the one-byte CSI (C1), DEL, set the title,
#: and bidirectional controls that reorder the text shown ("Trojan Source").
HOSTILE = "\x1b[2J\r\x07\x9b31m\x7f\x1b]0;pwned\x07\u202egpj.exe\u2066"
SHOWN = "\\x1b[2J\\x0d\\x07\\x9b31m\\x7f\\x1b]0;pwned\\x07\\u202egpj.exe\\u2066"
RAW = ("\x1b", "\r", "\x07", "\x9b", "\x7f", "\u202e", "\u2066")

CONFIG = """executor = "fake"
[[fake.devices]]
nodeid = "node-001"
name = "evil\\u001b[2Jdevice"
os = "Linux\\u009b31m"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("cli-security"), CONFIG, TOKEN) as proc:
        yield proc


@pytest.fixture
def env(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> ServerProcess:
    return as_operator(monkeypatch, server, TOKEN)


@pytest.fixture
def hostile_task(env: ServerProcess) -> str:
    """A finished task whose name, command and output hold HOSTILE; its id."""
    r = env.call("POST", "/task/create", TOKEN, json={"details": {
        "name": f"name{HOSTILE}", "command": f"echo {HOSTILE}", "nodeids": ["node-001"]}})
    assert r.status_code == 200, r.text
    task_id: str = r.json()["data"]["id"]
    deadline = time.monotonic() + 20
    while env.call("GET", f"/tasks/{task_id}", TOKEN).json()["data"]["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return task_id


def assert_safe(text: str) -> None:
    for char in RAW:
        assert char not in text, (char, text)


def test_show_and_list_print_control_characters_escaped(
    hostile_task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run("tasks", "show", hostile_task)
    assert code == 0
    assert_safe(out)
    assert f"name:         name{SHOWN}" in out
    assert f"command:      echo {SHOWN}" in out
    assert f"echo {SHOWN}" in out.split("--- output of node-001 ---")[1]  # the output
    code, out = run("tasks", "list", "--all")
    assert code == 0
    assert_safe(out)
    assert f"name{SHOWN}" in out
    code, out = run("tasks", "wait", hostile_task, "--output", "--interval", "0.1")
    assert code == 0
    assert_safe(out)
    assert_safe(capsys.readouterr().err)


def test_show_attempts_and_devices_print_control_characters_escaped(
    hostile_task: str,
) -> None:
    code, out = run("tasks", "show", hostile_task, "--attempts")
    assert code == 0
    assert_safe(out)
    assert f"-- output of attempt 1 --\necho {SHOWN}" in out
    code, out = run("devices")
    assert code == 0
    assert_safe(out)
    assert "evil\\x1b[2Jdevice" in out
    assert "Linux\\x9b31m" in out


def test_json_output_stays_json_with_the_text_as_it_is(hostile_task: str) -> None:
    code, out = run("tasks", "show", hostile_task, "--json")
    assert code == 0
    assert_safe(out)  # JSON escapes: \u001b, \u009b...
    task = json.loads(out)
    assert task["name"] == f"name{HOSTILE}"
    assert task["runs"][0]["output"] == f"echo {HOSTILE}\n"
    code, out = run("devices", "--json")
    assert_safe(out)
    assert json.loads(out)["online_devices"][0]["name"] == "evil\x1b[2Jdevice"


def test_error_messages_print_control_characters_escaped(
    env: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run("tasks", "show", f"no{HOSTILE}such")
    assert code == 3
    err = capsys.readouterr().err
    assert_safe(err)
    assert f"error 404: no task no{SHOWN}such" in err  # the server's message, with the id


def test_a_recovered_run_says_so_in_the_api_and_the_cli() -> None:
    """A run whose outcome came from the device's journal is marked in ``GET /tasks/{id}``
    (``recovered``, on the run and its attempt) and in ``tasks show``."""
    import io

    import attrs

    from ghostrunner import Attempt, Run, RunState
    from ghostrunner_http._render import render_run
    from ghostrunner_http.cli import _print_runs

    run = Run(task_id="t", node_id="node//a", state=RunState.SUCCEEDED, attempts=1,
              exit_code=0, recovered=True)
    rendered = render_run(run, history=[Attempt(number=1, state=RunState.SUCCEEDED,
                                                 exit_code=0, recovered=True)])
    assert rendered["recovered"] is True
    assert rendered["history"][0]["recovered"] is True
    out = io.StringIO()
    _print_runs([rendered], out, output=False)
    assert "succeeded (recovered)" in out.getvalue()
    assert render_run(attrs.evolve(run, recovered=False))["recovered"] is False
