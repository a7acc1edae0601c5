"""``ghostrunner serve``: a real uvicorn process on loopback, over the SQLite store.

Graceful stop on SIGTERM and SIGINT (exit 0), secrets never in the log nor in the
database files, starting and serving while MeshCentral refuses connections, the admin
token generated and printed once, HTTPS, configuration errors.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ghostrunner_http._tokens import hash_secret
from tests.http.conftest import REPO, SEED_TASK_BODY, ServerProcess

ServerFactory = Callable[..., ServerProcess]
ADMIN_SECRET = "serve-admin-secret-0123456789"
MESH_PASSWORD = "mesh-password-never-logged-42"


def _wait_succeeded(server: ServerProcess, token: str, task_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 15
    while True:
        task = server.call("GET", f"/tasks/{task_id}?output=true", token).json()["data"]
        if task["status"] == "succeeded":
            return dict(task)
        assert time.monotonic() < deadline, task
        time.sleep(0.05)


def test_serve_end_to_end_then_sigterm(server_factory: ServerFactory) -> None:
    server = server_factory(env={"GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET}).start()

    info = server.call("GET", "/").json()
    assert info["status"] == 200
    assert info["data"]["executor"] == "fake"

    # a write token, created over the API
    r = server.call("POST", "/token/create", ADMIN_SECRET,
                    json={"details": {"name": "ci", "scope": "write"}})
    assert r.status_code == 200, r.text
    writer = r.json()["data"]["token"]

    # the seed's TaskBody, byte for byte apart from the token
    body = SEED_TASK_BODY.replace(b"abc123securetoken", writer.encode())
    r = server.call("POST", "/task/create", content=body)
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["id"]

    task = _wait_succeeded(server, writer, task_id)
    runs = task["runs"]
    assert isinstance(runs, list)
    assert [run["exit_code"] for run in runs] == [0, 0, 0]
    assert all(run["output"] == "sudo apt update && sudo apt upgrade -y\n" for run in runs)

    r = server.call("GET", "/task/list", writer, params={"status": "succeeded"})
    assert [t["id"] for t in r.json()["data"]["tasks"]] == [task_id]
    devices = server.call("GET", "/devices", writer).json()["data"]
    assert devices["total_devices"] == 3
    assert len(devices["online_devices"]) == 3
    assert server.call("GET", "/token/list", writer).status_code == 403
    assert server.call("GET", "/task/list", "wrong").status_code == 401
    r = server.call("POST", "/task/create", writer, content=b"{nope")
    assert r.status_code == 400
    assert r.json()["status"] == 400
    r = server.call("POST", "/task/create", writer, content=b" " * (1024 * 1024 + 1))
    assert r.status_code == 413
    assert server.call("GET", "/openapi.json").json()["openapi"].startswith("3.1")

    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    log = server.log()
    assert "Application startup complete" in log
    assert "Finished server process" in log or "Shutting down" in log
    assert "Traceback" not in log

    # no secret in the log or the database; the database does hold the hashes
    stored = server.files_bytes()
    for secret in (ADMIN_SECRET, writer):
        assert secret not in log
        assert secret.encode() not in stored
    assert hash_secret(writer).encode() in stored

    # a restart serves the same data with the same tokens
    server.start()
    assert server.call("GET", f"/tasks/{task_id}", writer).json()["data"]["status"] == \
        "succeeded"
    assert server.stop(signal.SIGINT) == 0


def test_serve_starts_and_queues_when_meshcentral_refuses_connections(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        config='executor = "meshcentral"\n',
        env={
            "GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET,
            "GHOSTRUNNER_MESHCENTRAL_URL": "wss://127.0.0.1:1",
            "GHOSTRUNNER_MESHCENTRAL_USER": "ghostrunner",
            "GHOSTRUNNER_MESHCENTRAL_PASSWORD": MESH_PASSWORD,
        },
    ).start()
    info = server.call("GET", "/").json()["data"]
    assert info["executor"] == "meshcentral"
    assert info["executor_connected"] is False
    r = server.call("POST", "/task/create", ADMIN_SECRET, json={"details": {
        "name": "later", "command": "uptime", "nodeids": ["node//abc"]}})
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["id"]
    assert server.call("GET", f"/tasks/{task_id}", ADMIN_SECRET).json()["data"]["runs"][0][
        "state"] == "pending"
    devices = server.call("GET", "/devices", ADMIN_SECRET).json()["data"]
    assert devices == {"online_devices": [], "offline_devices": [], "total_devices": 0,
                       "executor_connected": False}
    # it tries to reach MeshCentral (and says so) while it serves
    deadline = time.monotonic() + 30
    while "unavailable" not in server.log() and "Connect call failed" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10
    log = server.log()
    assert MESH_PASSWORD not in log
    assert ADMIN_SECRET not in log
    assert "wss://127.0.0.1:1" in log
    assert MESH_PASSWORD.encode() not in server.files_bytes()


def test_a_password_in_the_meshcentral_url_is_never_logged(
    server_factory: ServerFactory,
) -> None:
    """``wss://user:password@host`` works as a MeshCentral URL; the password is in no
    line of the log (the start-up line, the executor's retries), the rest of the URL
    is."""
    in_url = "url-password-never-logged-17"
    server = server_factory(
        config='executor = "meshcentral"\n',
        env={
            "GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET,
            "GHOSTRUNNER_MESHCENTRAL_URL": f"wss://ghostrunner:{in_url}@127.0.0.1:1",
            "GHOSTRUNNER_MESHCENTRAL_USER": "ghostrunner",
            "GHOSTRUNNER_MESHCENTRAL_PASSWORD": MESH_PASSWORD,
            "GHOSTRUNNER_SERVER_LOG_LEVEL": "debug",
        },
    ).start()
    deadline = time.monotonic() + 30
    while "unavailable" not in server.log() and "Connect call failed" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert server.stop() == 0
    log = server.log()
    assert in_url not in log
    assert "wss://ghostrunner:[REDACTED]@127.0.0.1:1" in log


def test_serve_generates_the_admin_token_and_prints_it_once(
    server_factory: ServerFactory,
) -> None:
    server = server_factory().start()
    first = server.log()
    assert first.count("shown only this once") == 1
    secret = next(w for w in first.split() if w.startswith("gr_"))
    assert server.call("GET", "/token/list", secret).status_code == 200
    assert server.stop() == 0
    assert secret.encode() not in server.files_bytes()

    server.start()
    assert server.log().count("shown only this once") == 1  # not again
    assert server.call("GET", "/token/list", secret).status_code == 200
    assert server.stop() == 0


def _self_signed(workdir: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def test_serve_https(server_factory: ServerFactory, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = server_factory(
        env={"GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET,
             "GHOSTRUNNER_SERVER_TLS_CERT": str(cert),
             "GHOSTRUNNER_SERVER_TLS_KEY": str(key)},
        scheme="https",
    ).start(verify=ssl.create_default_context(cafile=str(cert)))
    r = httpx.get(server.url + "/task/list", verify=ssl.create_default_context(cafile=str(cert)),
                  headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
    assert r.status_code == 200
    assert server.stop() == 0


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ghostrunner_http.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_serve_configuration_errors_exit_2_naming_the_setting(tmp_path: Path) -> None:
    result = _run_cli("serve", env={"HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "meshcentral.url" in result.stderr
    assert "GHOSTRUNNER_MESHCENTRAL_URL" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('executor = "fake"\n[server]\nport = "x"\n', encoding="utf-8")
    result = _run_cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "server.port" in result.stderr


def test_serve_help_explains_meshcentral() -> None:
    result = _run_cli("serve", "--help")
    assert result.returncode == 0
    text = result.stdout
    for needle in ("[meshcentral]", "url = \"wss://", "GHOSTRUNNER_MESHCENTRAL_URL",
                   "GHOSTRUNNER_MESHCENTRAL_PASSWORD", "password_file", "executor = \"fake\"",
                   "--config", "GHOSTRUNNER_CONFIG", "unreachable"):
        assert needle in text, needle


def _serve_on(database: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """``ghostrunner serve`` (fake executor, any free port) on ``database``, expected to
    exit at start-up."""
    config.write_text(f'executor = "fake"\ndatabase = "{database}"\n[server]\nport = 0\n',
                      encoding="utf-8")
    return _run_cli("serve", "--config", str(config),
                    env={"GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET})


def test_serve_fails_cleanly_when_the_database_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "not-a-db").write_bytes(b"this is not sqlite" * 100)
    result = _serve_on(tmp_path / "not-a-db", tmp_path / "c.toml")
    assert result.returncode == 3, result.stderr
    assert ADMIN_SECRET not in result.stderr


def test_unknown_environment_variable_is_warned_about(server_factory: ServerFactory) -> None:
    server = server_factory(env={"GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET,
                                 "GHOSTRUNNER_SERVER_PROT": "1"}).start()
    assert server.stop() == 0
    assert "GHOSTRUNNER_SERVER_PROT" in server.log()
    assert json.dumps(ADMIN_SECRET)[1:-1] not in server.log()


def test_a_second_server_on_the_same_database_is_refused(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Two processes on one database would both dispatch its runs (an at_most_once
    command twice): the second exits 3, naming the first, which keeps serving."""
    first = server_factory(env={"GHOSTRUNNER_ADMIN_TOKEN": ADMIN_SECRET}).start()
    result = _serve_on(first.workdir / "ghostrunner.db", tmp_path / "second.toml")
    assert result.returncode == 3, result.stderr
    assert f"in use by another GhostRunner (pid {first.proc.pid}" in result.stderr
    assert first.call("GET", "/task/list", ADMIN_SECRET).status_code == 200
