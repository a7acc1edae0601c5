"""Security against a real server: secrets never leak, wrong tokens are cheap to refuse,
oversized bodies are refused, and the auth matrix holds over SQLite.

The in-process auth matrix (``tests/http/test_http_auth.py``: every route x no token,
wrong tokens, a revoked token, malformed headers, each scope, through the header and the
body) is complete; here the same refusals are checked against ``ghostrunner serve`` with
its SQLite store and token cache, plus what only a served app shows:

- token secrets and the MeshCentral password (and the base64 form libmeshctrl sends in
  its ``x-meshauth`` header) are in no database file (``-wal`` and ``-shm`` included,
  while running and after), no log line (at ``debug``, with the access log), no answer
  (but the one that creates a token), no repr, no error message;
- a flood of requests with wrong tokens from many connections leaves the p50 latency of
  valid requests within 3x of what it is without the flood;
- bodies over the limit get 413, declared (``Content-Length``) or streamed
  (``Transfer-Encoding: chunked``), and the server stays healthy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ghostrunner import GhostRunner
from ghostrunner.meshcentral._executor import MeshCentralExecutor
from ghostrunner.sqlite import SQLiteStore
from ghostrunner.testing import FakeExecutor, InMemoryStore
from ghostrunner.tokens import Scope
from ghostrunner_http import Settings
from ghostrunner_http._client import ApiClient, ApiFailure
from ghostrunner_http._tokens import hash_secret, new_token
from ghostrunner_http.config import ConfigError, load_settings
from tests.reliability.rawhttp import Connection, build, percentile
from tests.serverproc import ServerProcess

ADMIN = "security-admin-secret-0123456789abcdef"
MESH_PASSWORD = "mesh-pass-7f3a9c1e5b"
MESH_USER = "ghostrunner-svc"
LIMIT = 1024 * 1024  # the default max_body_bytes


def _mesh_forms(password: str = MESH_PASSWORD) -> list[str]:
    """The password as configured and as libmeshctrl sends it (base64 in x-meshauth)."""
    return [password, base64.b64encode(password.encode()).decode()]


# --------------------------------------------------------------------------- a fake MeshCentral


class _Recorder(socketserver.BaseRequestHandler):
    """Reads the websocket handshake, keeps it, refuses it (403)."""

    seen: list[bytes]

    def handle(self) -> None:
        data = b""
        self.request.settimeout(5)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = self.request.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.seen.append(data)
            self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")


@contextlib.contextmanager
def fake_meshcentral() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback TCP server that records what the executor sends; (port, requests)."""
    seen: list[bytes] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-meshcentral")
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --------------------------------------------------------------------------- secrets


class Exchange:
    """Calls a served app with httpx, keeping every answer to search for secrets."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.answers: list[str] = []

    def __call__(self, method: str, path: str, token: str | None = None, *,
                 keep: bool = True, **kw: Any) -> httpx.Response:
        r = self.server.call(method, path, token, **kw)
        if keep:
            self.answers.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r


def _assert_absent(where: str, text: str | bytes, secrets_: list[str]) -> None:
    for secret in secrets_:
        needle: str | bytes = secret.encode() if isinstance(text, bytes) else secret
        assert needle not in text, f"a secret ({secret[:6]}...) is in {where}"


def test_secrets_never_leak_from_a_served_server(tmp_path: Path, figures: Any) -> None:
    with fake_meshcentral() as (mesh_port, handshakes):
        server = ServerProcess(tmp_path, 'executor = "meshcentral"\n', env={
            "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
            "GHOSTRUNNER_MESHCENTRAL_URL": f"ws://127.0.0.1:{mesh_port}",
            "GHOSTRUNNER_MESHCENTRAL_USER": MESH_USER,
            "GHOSTRUNNER_MESHCENTRAL_PASSWORD": MESH_PASSWORD,
            "GHOSTRUNNER_SERVER_LOG_LEVEL": "debug",
            "GHOSTRUNNER_SERVER_ACCESS_LOG": "true",
        })
        try:
            _exercise_and_check(server, handshakes, figures)
        finally:
            server.kill()


def _exercise_and_check(server: ServerProcess, handshakes: list[bytes],
                        figures: Any) -> None:
    server.start()
    call = Exchange(server)
    created: dict[str, str] = {}
    for scope in Scope:
        r = call("POST", "/token/create", ADMIN, keep=False,
                 json={"details": {"name": f"sec-{scope.value}", "scope": scope.value}})
        assert r.status_code == 200, r.text
        created[scope.value] = r.json()["data"]["token"]
        # the one answer that carries a secret is not to be cached by anyone
        assert r.headers["cache-control"] == "no-store"
    revoked = created.pop(Scope.ADMIN.value)
    secrets_ = [ADMIN, revoked, *created.values(), *_mesh_forms()]

    # ordinary use, through the header and through the body
    for token in (ADMIN, created["write"], created["read"]):
        assert call("GET", "/task/list", token).status_code == 200
        assert call("GET", "/task/list", content=json.dumps({"authtoken": token})
                    ).status_code == 200
        assert call("GET", "/devices", token).status_code == 200
    r = call("POST", "/task/create", created["write"], json={"details": {
        "name": "later", "command": "uptime", "nodeids": ["node//abc"]}})
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["id"]
    assert call("GET", f"/tasks/{task_id}", created["read"]).status_code == 200
    assert call("GET", "/token/list", ADMIN).status_code == 200
    assert call("GET", "/").status_code == 200
    assert call("DELETE", "/token/delete", ADMIN, json={"details": {"name": "sec-admin"}}
                ).status_code == 200
    assert call("GET", "/task/list", revoked).status_code == 401

    # bad requests that carry a secret: no answer may echo it
    write = created["write"]
    bad: list[tuple[dict[str, Any], int]] = [
        ({"headers": {"Authorization": f"Token {write}"}}, 401),
        ({"headers": {"Authorization": f"Bearer {write} trailing"}}, 401),
        ({"headers": {"Authorization": f"Bearer {write}x"}}, 401),
        ({"headers": {"Authorization": write}}, 401),
        ({"content": json.dumps({"authtoken": write + "x"})}, 401),
        ({"content": json.dumps({"authtoken": [write]})}, 401),
        ({"content": json.dumps({"authtoken": {"token": write}})}, 401),
        ({"content": json.dumps({"authtoken": write, "bogus": write})}, 422),
        ({"content": json.dumps({"authtoken": write, "details": 1})[:-3]}, 400),
        ({"content": '{"authtoken": "' + write + '", "x": NaN}'}, 400),
        ({"content": '{"authtoken": "' + write + '\\ud800"}'}, 422),
        ({"content": b"\xff" + write.encode()}, 400),
        ({"content": json.dumps({"authtoken": write, "details": {
            "name": "n", "command": "c", "nodeids": [write], "max_attempts": write}})}, 422),
        ({"content": json.dumps({"authtoken": write, "details": {
            "name": "n", "command": "c", "nodeids": ["a"], "timeout": -1}})}, 422),
    ]
    for kwargs, status in bad:
        r = call("POST", "/task/create", **kwargs)
        assert r.status_code == status, (kwargs, r.text)
    # secrets in the query string, where the access log sees them: redacted there
    r = call("GET", f"/task/list?authtoken={write}", write)
    assert r.status_code == 422
    r = call("GET", f"/task/list?name={ADMIN}", ADMIN)
    assert r.status_code == 200

    # the executor really sent the password (base64, in x-meshauth) to "MeshCentral"
    deadline = time.monotonic() + 30
    while not handshakes or "unavailable" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    sent = b"\n".join(handshakes)
    assert _mesh_forms()[1].encode() in sent

    # while it runs: the database files (the WAL holds the latest writes)
    assert (server.workdir / "ghostrunner.db-wal").exists()
    running_files = server.files_bytes()
    assert hash_secret(write).encode() in running_files  # the tokens are in what is searched
    figures.add("secrets: database files checked while running (bytes)", len(running_files))
    _assert_absent("the database files while running", running_files, secrets_)
    assert server.stop() == 0
    _assert_absent("the database files after the stop", server.files_bytes(), secrets_)
    _assert_absent("the answers", "\n".join(call.answers), secrets_)

    log = server.log()
    _assert_absent("the log", log, secrets_)
    # nothing even tried to log a secret, except the access log's request line with
    # the secrets deliberately sent in the query string (redacted there)
    redacted = [line for line in log.splitlines() if "[REDACTED]" in line]
    assert len(redacted) == 2, redacted
    assert all("GET /task/list?" in line for line in redacted), redacted
    figures.add("secrets: log lines checked (debug level, access log on)",
                len(log.splitlines()))
    figures.add("secrets: answers checked", len(call.answers))


def test_reprs_and_error_messages_hold_no_secret(tmp_path: Path) -> None:
    token, secret = new_token("t", Scope.ADMIN)
    settings = load_settings(None, {
        "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
        "GHOSTRUNNER_MESHCENTRAL_URL": "wss://mesh.example.com",
        "GHOSTRUNNER_MESHCENTRAL_USER": MESH_USER,
        "GHOSTRUNNER_MESHCENTRAL_PASSWORD": MESH_PASSWORD,
    })
    executor = MeshCentralExecutor("wss://mesh.example.com", user=MESH_USER,
                                   password=MESH_PASSWORD)
    store = SQLiteStore(tmp_path / "r.db")
    client = ApiClient("http://127.0.0.1:1", token=secret)
    runner = GhostRunner(store=InMemoryStore(), executor=FakeExecutor(devices=["n"]))
    texts = [repr(token), str(token), repr(settings), str(settings), repr(settings.loop),
             repr(executor), str(executor), repr(store), repr(client), repr(runner),
             repr(ApiFailure(401, "invalid or revoked token"))]
    # configuration errors raised next to secrets name the setting, never a value
    for env in (
        {"GHOSTRUNNER_ADMIN_TOKEN": MESH_PASSWORD[:8]},  # too short
        {"GHOSTRUNNER_EXECUTOR": "meshcentral", "GHOSTRUNNER_MESHCENTRAL_URL": "https://m",
         "GHOSTRUNNER_MESHCENTRAL_USER": MESH_USER,
         "GHOSTRUNNER_MESHCENTRAL_PASSWORD": MESH_PASSWORD},
        {"GHOSTRUNNER_MESHCENTRAL_URL": "wss://m", "GHOSTRUNNER_MESHCENTRAL_USER": MESH_USER,
         "GHOSTRUNNER_MESHCENTRAL_PASSWORD": MESH_PASSWORD,
         "GHOSTRUNNER_SERVER_PORT": "not-a-port"},
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings(None, env)
        texts.append(str(caught.value))
    with pytest.raises(ConfigError) as caught:
        Settings(executor="fake", admin_token=MESH_PASSWORD[:10])
    texts.append(str(caught.value))
    text = "\n".join(texts)
    for needle in (secret, token.secret_hash, ADMIN, *_mesh_forms(), MESH_PASSWORD[:8]):
        assert needle not in text, needle
    assert "wss://mesh.example.com" in text  # the reprs do say something useful


# --------------------------------------------------------------------------- a fake-executor server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``ghostrunner serve --executor fake`` (SQLite) for the tests below."""
    server = ServerProcess(tmp_path_factory.mktemp("served"), 'executor = "fake"\n', env={
        "GHOSTRUNNER_ADMIN_TOKEN": ADMIN,
        "GHOSTRUNNER_SERVER_ACCESS_LOG": "false",
    })
    try:
        yield server.start()
        assert "Traceback" not in server.log()
    finally:
        server.kill()


# every protected route: (method, path, body, the scope it needs); {id} is a task made first
ROUTES: list[tuple[str, str, dict[str, Any] | None, Scope]] = [
    ("POST", "/token/create", {"details": {"name": "m-new", "scope": "read"}}, Scope.ADMIN),
    ("DELETE", "/token/delete", {"details": {"name": "m-victim"}}, Scope.ADMIN),
    ("GET", "/token/list", None, Scope.ADMIN),
    ("POST", "/task/create", {"details": {"name": "m", "command": "c",
                                          "nodeids": ["node//offline"]}}, Scope.WRITE),
    ("DELETE", "/task/delete", {"details": {"name": "m-none"}}, Scope.WRITE),
    ("GET", "/task/list", None, Scope.READ),
    ("DELETE", "/task/flush", None, Scope.WRITE),
    ("GET", "/tasks/{id}", None, Scope.READ),
    ("DELETE", "/tasks/{id}", None, Scope.WRITE),
    ("POST", "/tasks/{id}/cancel", {}, Scope.WRITE),
    ("GET", "/devices", None, Scope.READ),
]


def test_auth_matrix_against_the_served_app(served: ServerProcess) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        _matrix(client)


def _matrix(client: httpx.Client) -> None:
    def call(method: str, url: str, secret: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
        return client.request(method, url, headers=headers, **kw)

    def token(name: str, scope: Scope) -> str:
        r = call("POST", "/token/create", ADMIN,
                 json={"details": {"name": name, "scope": scope.value}})
        assert r.status_code == 200, r.text
        secret: str = r.json()["data"]["token"]
        return secret

    tokens = {scope: token(f"m-{scope.value}", scope) for scope in Scope}
    # a revoked token that was in use (so the server's token cache knew it)
    revoked = token("m-revoked", Scope.ADMIN)
    assert call("GET", "/token/list", revoked).status_code == 200
    assert call("DELETE", "/token/delete", ADMIN,
                json={"details": {"name": "m-revoked"}}).status_code == 200
    # and a new token under the same name: the old secret stays refused
    renamed = token("m-revoked", Scope.READ)
    wrong = "gr_" + secrets.token_urlsafe(32)

    for method, path, body, needed in ROUTES:
        r = call("POST", "/task/create", ADMIN, json={"details": {
            "name": "m-task", "command": "c", "nodeids": ["node//offline"]}})
        url = path.replace("{id}", r.json()["data"]["id"])
        for label, secret, via in (("none", None, "header"), ("wrong", wrong, "header"),
                                   ("wrong", wrong, "body"), ("revoked", revoked, "header"),
                                   ("revoked", revoked, "body")):
            kw: dict[str, Any] = {}
            content = dict(body or {})
            if via == "body" and secret is not None:
                content["authtoken"] = secret
                secret = None
            if content:
                kw["content"] = json.dumps(content)
            r = call(method, url, secret, **kw)
            assert r.status_code == 401, (label, via, method, path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
        for scope, secret in (*tokens.items(), (Scope.READ, renamed)):
            if needed is Scope.ADMIN and path == "/token/delete":
                call("POST", "/token/create", ADMIN, json={"details": {"name": "m-victim"}})
            r = call(method, url, secret,
                     content=json.dumps(body) if body is not None else None)
            if scope.allows(needed):  # past the token check (404, 409: the route's own say)
                assert r.status_code in (200, 404, 409), (scope, method, path, r.text)
            else:
                assert r.status_code == 403, (scope, method, path, r.text)
        call("DELETE", "/token/delete", ADMIN, json={"details": {"name": "m-new"}})


# --------------------------------------------------------------------------- wrong-token flood

FLOOD_CONNECTIONS = 50
FLOOD_REQUESTS = 2500
#: the flood's pace, all connections together: a third or so of what this server
#: answers when saturated with such requests on two cores (measured: about 1,300/s)
FLOOD_RATE = 400.0
VALID_REQUESTS = 300


def _wrong() -> bytes:
    """A request with a wrong token: a new one every time (no cache can help), shaped
    like a real one, in the header or in the body."""
    wrong = "gr_" + secrets.token_urlsafe(32)
    if secrets.randbelow(2):
        return build("GET", "/task/list", json.dumps({"authtoken": wrong}).encode())
    return build("GET", "/task/list", token=wrong)


async def _latencies(port: int, count: int, request: bytes) -> list[float]:
    conn = await Connection.open(port)
    out: list[float] = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            status, _, body = await conn.send(request)
            out.append((time.perf_counter() - began) * 1000)
            assert status == 200, body[:300]
    finally:
        await conn.close()
    return out


class Flood:
    """``FLOOD_CONNECTIONS`` connections sending wrong tokens at ``FLOOD_RATE`` in all."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.connected = 0
        self.all_connected = asyncio.Event()
        self.stop = asyncio.Event()

    async def _connection(self) -> None:
        conn = await Connection.open(self.port)
        self.connected += 1
        if self.connected == FLOOD_CONNECTIONS:
            self.all_connected.set()
        interval = FLOOD_CONNECTIONS / FLOOD_RATE
        due = time.monotonic() + interval * secrets.randbelow(1000) / 1000  # spread out
        try:
            while not self.stop.is_set():
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += interval
                status, _, _ = await conn.send(_wrong())
                self.sent += 1
                self.statuses[status] = self.statuses.get(status, 0) + 1
        finally:
            await conn.close()

    async def run_while(self, measure: Any) -> tuple[list[float], float]:
        """Flood while ``measure()`` is called again and again, until the flood has sent
        ``FLOOD_REQUESTS``; returns what the calls returned and the flood's duration."""
        tasks = [asyncio.create_task(self._connection()) for _ in range(FLOOD_CONNECTIONS)]
        began = time.monotonic()
        try:
            await asyncio.wait_for(self.all_connected.wait(), 30)
            out: list[float] = []
            while len(out) < VALID_REQUESTS or self.sent < FLOOD_REQUESTS:
                out += await measure()
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)
        return out, time.monotonic() - began


async def _flood_figures(port: int, token: str) -> dict[str, Any]:
    valid = build("GET", "/task/list?limit=10", token=token)
    await _latencies(port, 30, valid)  # warm up (the valid token is cached from now)
    before = await _latencies(port, VALID_REQUESTS, valid)
    flood = Flood(port)
    during, elapsed = await flood.run_while(lambda: _latencies(port, 50, valid))
    after = await _latencies(port, VALID_REQUESTS, valid)
    return {"before": before, "during": during, "after": after, "flood": flood,
            "elapsed": elapsed}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _burst(port: int, make: Any, count: int, connections: int = 20) -> None:
    async def one(n: int) -> None:
        conn = await Connection.open(port)
        try:
            for _ in range(n):
                await conn.send(make())
        finally:
            await conn.close()

    await asyncio.gather(*(one(count // connections) for _ in range(connections)))


def _server_cpu_ms(server: ServerProcess, make: Any, count: int = 2000) -> float:
    """Server CPU milliseconds per request, over ``count`` requests sent flat out."""
    assert server.proc is not None
    before = _cpu_seconds(server.proc.pid)
    asyncio.run(_burst(server.port, make, count))
    return (_cpu_seconds(server.proc.pid) - before) * 1000 / count


def test_wrong_token_flood_does_not_slow_valid_requests(served: ServerProcess,
                                                        figures: Any) -> None:
    for i in range(20):  # something to list
        served.call("POST", "/task/create", ADMIN, json={"details": {
            "name": f"f{i}", "command": "c", "nodeids": ["node//offline"]}})
    got = asyncio.run(_flood_figures(served.port, ADMIN))
    flood: Flood = got["flood"]
    alone = (percentile(got["before"], 50) + percentile(got["after"], 50)) / 2
    during = percentile(got["during"], 50)
    figures.add("flood: wrong-token requests", flood.sent)
    figures.add("flood: connections", FLOOD_CONNECTIONS)
    figures.add("flood: wrong-token requests/s", flood.sent / got["elapsed"], "req/s")
    figures.add("flood: valid GET /task/list p50 alone", alone, "ms")
    figures.add("flood: valid GET /task/list p50 during the flood", during, "ms")
    figures.add("flood: p50 ratio during/alone", during / alone, "x")
    assert flood.statuses == {401: flood.sent}, flood.statuses
    assert flood.sent >= FLOOD_REQUESTS
    assert during < 3 * alone, (alone, during)

    # refusing a wrong token costs the server no more than serving a cheap valid
    # request (no slow hashing, no lock): CPU per request, flat out
    wrong_ms = _server_cpu_ms(served, _wrong)
    valid_ms = _server_cpu_ms(served, lambda: build("GET", "/devices", token=ADMIN))
    figures.add("flood: server CPU per wrong-token request", wrong_ms, "ms")
    figures.add("flood: server CPU per valid GET /devices", valid_ms, "ms")
    assert wrong_ms < 2 * valid_ms, (wrong_ms, valid_ms)


# --------------------------------------------------------------------------- 413


async def _send_streaming(port: int, head: bytes, chunks: int, size: int
                          ) -> tuple[int, bytes, int]:
    """Send ``head`` then ``chunks`` chunks of ``size`` bytes (chunked encoding) while
    reading the answer; returns (status, body, bytes of body sent before it came)."""
    conn = await Connection.open(port)
    conn.writer.write(head)
    sent = 0

    async def write() -> None:
        nonlocal sent
        piece = f"{size:x}\r\n".encode() + b" " * size + b"\r\n"
        with contextlib.suppress(OSError):
            for _ in range(chunks):
                conn.writer.write(piece)
                await conn.writer.drain()
                sent += size
            conn.writer.write(b"0\r\n\r\n")
            await conn.writer.drain()

    writer = asyncio.create_task(write())
    try:
        status, _, body = await asyncio.wait_for(conn.read_answer(), 30)
        sent_when_answered = sent
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await conn.close()
    return status, body, sent_when_answered


async def _declared_only(port: int, length: int) -> tuple[int, bytes]:
    """Declare a huge Content-Length, send none of it: the answer must come at once."""
    conn = await Connection.open(port)
    try:
        head = build("POST", "/task/create", token=ADMIN)
        head = head.replace(b"Content-Length: 0", f"Content-Length: {length}".encode())
        conn.writer.write(head)
        status, _, body = await asyncio.wait_for(conn.read_answer(), 30)
    finally:
        await conn.close()
    return status, body


def test_bodies_over_the_limit_are_413_on_the_served_app(served: ServerProcess,
                                                         figures: Any) -> None:
    before = served.call("GET", "/task/list?limit=1000", ADMIN).json()["data"]["tasks"]

    def padded(name: str, size: int) -> bytes:
        body = json.dumps({"details": {"name": name, "command": "c",
                                       "nodeids": ["node//offline"]}}).encode()
        return body[:-1] + b" " * (size - len(body)) + b"}"

    # declared (Content-Length): over the limit by one byte
    r = served.call("POST", "/task/create", ADMIN, content=padded("over", LIMIT + 1))
    assert r.status_code == 413, r.text
    assert r.json() == {"status": 413, "message": r.json()["message"],
                        "data": {"error": "payload_too_large"}}
    # exactly at the limit: read and accepted
    r = served.call("POST", "/task/create", ADMIN, content=padded("at-limit", LIMIT))
    assert r.status_code == 200, r.text
    # declared far over the limit, nothing sent: refused without waiting for the body
    status, answer = asyncio.run(_declared_only(served.port, 10 * 1024**3))
    assert status == 413, answer
    # chunked, no Content-Length: up to 32 MiB streamed in 64 KiB chunks; the 413 comes
    # once the limit is passed, long before the client is done
    head = build("POST", "/task/create", token=ADMIN,
                 headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
    status, answer, sent = asyncio.run(_send_streaming(served.port, head, 512, 64 * 1024))
    assert status == 413, answer
    assert json.loads(answer)["data"] == {"error": "payload_too_large"}
    figures.add("413: chunked body: MiB written by the client when the 413 came",
                sent / 1024**2, "MiB")
    assert sent < 32 * 1024**2
    # a small chunked body is fine
    small = json.dumps({"details": {"name": "chunked", "command": "c",
                                    "nodeids": ["node//offline"]}}).encode()
    head = build("POST", "/task/create", token=ADMIN,
                 headers={"Transfer-Encoding": "chunked"})
    status, answer = asyncio.run(_send_chunks(served.port, head, [small[:10], small[10:]]))
    assert status == 200, answer
    # the server is healthy, and the refused bodies created nothing
    after = served.call("GET", "/task/list?limit=1000", ADMIN).json()["data"]["tasks"]
    new = sorted(t["name"] for t in after if t["id"] not in {t["id"] for t in before})
    assert new == ["at-limit", "chunked"]


async def _send_chunks(port: int, head: bytes, chunks: list[bytes]) -> tuple[int, bytes]:
    conn = await Connection.open(port)
    try:
        payload = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
        conn.writer.write(head + payload + b"0\r\n\r\n")
        status, _, body = await asyncio.wait_for(conn.read_answer(), 30)
    finally:
        await conn.close()
    return status, body
