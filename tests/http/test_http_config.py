"""Settings from TOML and the environment; secrets kept out of reprs and logs."""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import pytest

from ghostrunner_http import ConfigError, FakeDevice, Settings, create_app, load_settings
from ghostrunner_http._logging import (
    RedactingFormatter,
    configure_logging,
    redact,
    redact_url,
)
from ghostrunner_http.config import KNOWN_KEYS, env_var, unknown_env

MESH = {
    "GHOSTRUNNER_MESHCENTRAL_URL": "wss://mesh.example.com",
    "GHOSTRUNNER_MESHCENTRAL_USER": "ghost",
    "GHOSTRUNNER_MESHCENTRAL_PASSWORD": "hunter2-mesh-password",
}


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ghostrunner.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    s = Settings(executor="fake")
    assert s.database == Path("ghostrunner.db")
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.max_body_bytes == 1024 * 1024
    assert (s.header_timeout, s.body_timeout, s.max_connections) == (10.0, 60.0, 1000)
    assert [d.nodeid for d in s.fake_devices] == ["node-001", "node-002", "node-003"]
    assert all(d.online for d in s.fake_devices)


def test_meshcentral_is_the_default_and_needs_its_settings() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {})
    assert info.value.key == "meshcentral.url"
    assert "GHOSTRUNNER_MESHCENTRAL_URL" in str(info.value)
    assert 'executor = "fake"' in str(info.value)
    s = load_settings(None, MESH)
    assert s.executor == "meshcentral"
    assert s.meshcentral_url == "wss://mesh.example.com"


def test_full_toml(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-a-file\n", encoding="utf-8")
    path = _toml(tmp_path, f"""
database = "{tmp_path}/gr.db"
database_synchronous = "normal"
executor = "meshcentral"
admin_token = "an-admin-token-long-enough"

[server]
host = "0.0.0.0"
port = 9443
tls_cert = "{tmp_path}/cert.pem"
tls_key = "{tmp_path}/key.pem"
max_body_bytes = 4096
log_level = "DEBUG"
access_log = false

[meshcentral]
url = "wss://mesh.example.com:4430"
user = "~t:abcdef"
password_file = "{tmp_path}/pw"
ignore_ssl = true
group_id = "mesh//xyz"

[loop]
max_in_flight = 8
resync_interval = 2.5
shutdown_grace = 3

[fake]
devices = ["a", {{nodeid = "b", name = "Bee", online = false}},
           {{nodeid = "c", group = "pis", tags = ["arm", "lab"], os = "Raspbian"}}]
""")
    s = load_settings(path, {})
    assert s.database == tmp_path / "gr.db"
    assert s.database_synchronous == "NORMAL"
    assert (s.host, s.port, s.max_body_bytes, s.log_level, s.access_log) == (
        "0.0.0.0", 9443, 4096, "debug", False)
    assert s.tls_cert == tmp_path / "cert.pem"
    assert s.scheme == "https"
    assert s.meshcentral_password == "from-a-file"
    assert s.meshcentral_ignore_ssl
    assert s.meshcentral_group_id == "mesh//xyz"
    assert s.loop.max_in_flight == 8
    assert s.loop.resync_interval == 2.5
    assert s.loop.shutdown_grace == 3.0
    assert s.fake_devices == (
        FakeDevice(nodeid="a", name="a"),
        FakeDevice(nodeid="b", name="Bee", online=False),
        FakeDevice(nodeid="c", name="c", group="pis", tags=("arm", "lab"), os="Raspbian"),
    )
    assert s.admin_token == "an-admin-token-long-enough"


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'executor = "fake"\n[server]\nport = 1111\n')
    s = load_settings(path, {"GHOSTRUNNER_SERVER_PORT": "2222",
                             "GHOSTRUNNER_LOOP_RETRY_CAP": "9.5",
                             "GHOSTRUNNER_FAKE_DEVICES": "x=Ex, y"})
    assert s.port == 2222
    assert s.loop.retry.cap == 9.5
    assert s.fake_devices == (FakeDevice(nodeid="x", name="Ex"), FakeDevice(nodeid="y",
                                                                            name="y"))
    # and overrides (command-line flags) win over both
    s = load_settings(path, {"GHOSTRUNNER_SERVER_PORT": "2222"}, {"server.port": 3333})
    assert s.port == 3333


def test_environment_secret_file_wins_over_a_password_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("env-file-password", encoding="utf-8")
    path = _toml(tmp_path, '[meshcentral]\nurl = "wss://m"\nuser = "u"\npassword = "toml"\n')
    s = load_settings(path, {"GHOSTRUNNER_MESHCENTRAL_PASSWORD_FILE": str(tmp_path / "pw")})
    assert s.meshcentral_password == "env-file-password"


def test_every_key_has_an_environment_variable() -> None:
    assert env_var("meshcentral.url") == "GHOSTRUNNER_MESHCENTRAL_URL"
    assert env_var("database") == "GHOSTRUNNER_DATABASE"
    assert len({env_var(k) for k in KNOWN_KEYS}) == len(KNOWN_KEYS)
    for key in KNOWN_KEYS:
        assert env_var(key).startswith("GHOSTRUNNER_")


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("bogus = 1", {}, "bogus"),
        ("[server]\nprot = 1", {}, "server.prot"),
        ("server = 1", {}, "server"),
        ('executor = "docker"', {}, "executor"),
        ('executor = "fake"\ndatabase_synchronous = "OFF"', {}, "database_synchronous"),
        ('executor = "fake"\n[server]\nport = "http"', {}, "server.port"),
        ('executor = "fake"\n[server]\nport = 70000', {}, "server.port"),
        ('executor = "fake"\n[server]\nmax_body_bytes = 10', {}, "server.max_body_bytes"),
        ('executor = "fake"\n[server]\nheader_timeout = 0', {}, "server.header_timeout"),
        ('executor = "fake"\n[server]\nbody_timeout = 1e9', {}, "server.body_timeout"),
        ('executor = "fake"\n[server]\nbody_timeout = "soon"', {}, "server.body_timeout"),
        ('executor = "fake"\n[server]\nmax_connections = 0', {}, "server.max_connections"),
        ('executor = "fake"', {"GHOSTRUNNER_SERVER_HEADER_TIMEOUT": "nan"},
         "server.header_timeout"),
        ('executor = "fake"\n[server]\ntls_cert = "c.pem"', {}, "server.tls_cert"),
        ('executor = "fake"\n[server]\nlog_level = "loud"', {}, "server.log_level"),
        ('executor = "fake"\n[server]\naccess_log = "maybe"', {}, "server.access_log"),
        ('executor = "fake"\nadmin_token = "short"', {}, "admin_token"),
        ('executor = "fake"\n[loop]\nretry_base = 0', {}, "loop.retry_base"),
        ('executor = "fake"\n[loop]\nresync_interval = -1', {}, "loop.resync_interval"),
        ('executor = "fake"\n[loop]\noutput_limit = 1', {}, "loop.output_limit"),
        ('executor = "fake"\n[loop]\nmax_in_flight = 0', {}, "loop"),
        ('executor = "fake"\n[fake]\ndevices = [1]', {}, "fake.devices[0]"),
        ('executor = "fake"\n[fake]\ndevices = [{name = "x"}]', {}, "fake.devices[0].nodeid"),
        ('executor = "fake"\n[fake]\ndevices = [{nodeid = "x", tags = "arm"}]', {},
         "fake.devices[0].tags"),
        ('executor = "fake"\n[fake]\ndevices = [{nodeid = "x", tags = [1]}]', {},
         "fake.devices[0].tags[0]"),
        ('[meshcentral]\nurl = "https://m"\nuser = "u"\npassword = "p"', {},
         "meshcentral.url"),
        ('[meshcentral]\nurl = "wss://m"\nuser = "u"', {}, "meshcentral.password"),
        ('[meshcentral]\nurl = "wss://m"\nuser = "u"\npassword_file = "/nonexistent/pw"', {},
         "meshcentral.password_file"),
        ("not toml [", {}, "config"),
        ('executor = "fake"', {"GHOSTRUNNER_SERVER_PORT": "eighty"}, "server.port"),
        ('executor = "fake"', {"GHOSTRUNNER_LOOP_RETRY_CAP": "nan"}, "loop.retry_cap"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                       key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_toml(tmp_path, text), env)
    assert info.value.key == key


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.toml", {})
    assert info.value.key == "config"


def test_unknown_environment_variables_are_reported() -> None:
    env = {"GHOSTRUNNER_SERVER_PROT": "1", "GHOSTRUNNER_URL": "x", "GHOSTRUNNER_TOKEN": "t",
           "GHOSTRUNNER_DATABASE": "d", "PATH": "/bin"}
    assert unknown_env(env) == ["GHOSTRUNNER_SERVER_PROT"]


def test_secrets_are_not_in_the_repr() -> None:
    s = load_settings(None, {**MESH, "GHOSTRUNNER_ADMIN_TOKEN": "admin-token-secret-xyz"})
    text = repr(s) + str(s)
    assert "hunter2-mesh-password" not in text
    assert "admin-token-secret-xyz" not in text
    assert "wss://mesh.example.com" in text
    assert set(s.secrets) == {"hunter2-mesh-password", "admin-token-secret-xyz"}


# --------------------------------------------------------------------------- redaction


def test_redact() -> None:
    text = ("login hunter2 Authorization: Bearer abc.def authtoken=xyz&x=1 "
            '{"authtoken": "qqq"} token gr_AbCdEfGhIjKlMnOpQrStUv password=pw1')
    out = redact(text, ["hunter2"])
    for secret in ("hunter2", "abc.def", "xyz", "qqq", "gr_AbCdEfGhIjKlMnOpQrStUv", "pw1"):
        assert secret not in out, secret
    assert "x=1" in out


def test_configured_logging_redacts_everything(tmp_path: Path) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", ["s3cr3t-value"], stream=stream)
        logging.getLogger("uvicorn.error").info("password is %s", "s3cr3t-value")
        try:
            raise RuntimeError("boom s3cr3t-value")
        except RuntimeError:
            logging.getLogger("meshctrl").exception("failed")
        logging.getLogger("ghostrunner.x").warning("got gr_0123456789abcdefghij")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    out = stream.getvalue()
    assert "s3cr3t-value" not in out
    assert "gr_0123456789abcdefghij" not in out
    assert out.count("[REDACTED]") >= 3
    assert "RuntimeError" in out


URL_PASSWORD = "pass-in-the-url-77"


@pytest.mark.parametrize(("url", "shown"), [
    (f"wss://ghost:{URL_PASSWORD}@mesh.example.com:4443/x?y=1",
     "wss://ghost:[REDACTED]@mesh.example.com:4443/x?y=1"),
    (f"wss://ghost:p@ss{URL_PASSWORD}@mesh.example.com", "wss://ghost:[REDACTED]@mesh.example.com"),
    (f"WSS://:{URL_PASSWORD}@h", "WSS://:[REDACTED]@h"),
    (f"see http://a:{URL_PASSWORD}@b/ and https://c:{URL_PASSWORD}@d",
     "see http://a:[REDACTED]@b/ and https://c:[REDACTED]@d"),
    ("wss://mesh.example.com:443/path", "wss://mesh.example.com:443/path"),  # unchanged
    ("wss://ghost@mesh.example.com", "wss://ghost@mesh.example.com"),
    ("/var/lib/ghostrunner/ghostrunner.db", "/var/lib/ghostrunner/ghostrunner.db"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_password_in_the_meshcentral_url_is_a_secret() -> None:
    s = load_settings(None, {**MESH, "GHOSTRUNNER_MESHCENTRAL_URL":
                             f"wss://ghost:{URL_PASSWORD}@mesh.example.com"})
    assert URL_PASSWORD not in repr(s) + str(s)
    assert "wss://ghost:[REDACTED]@mesh.example.com" in repr(s)
    assert URL_PASSWORD in s.secrets


def test_logged_urls_lose_their_password(tmp_path: Path) -> None:
    """Whoever logs a URL (the MeshCentral executor, libmeshctrl, websockets): under
    ``serve``'s logging its password is redacted, configured as a secret or not."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", [], stream=stream)
        logging.getLogger("ghostrunner.meshcentral").info(
            "connected to MeshCentral at %s as %s",
            f"wss://ghost:{URL_PASSWORD}@mesh.example.com", "ghost")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert URL_PASSWORD not in stream.getvalue()
    assert "wss://ghost:[REDACTED]@mesh.example.com as ghost" in stream.getvalue()


def test_formatter_ignores_empty_secrets() -> None:
    formatter = RedactingFormatter("%(message)s", ["", "x-secret"])
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "a x-secret b", None, None)
    assert formatter.format(record) == "a [REDACTED] b"


def test_the_default_store_creates_its_directory_and_files_private(tmp_path: Path) -> None:
    """``serve``'s database directory, made under ``umask 000``, is 0700 and the files
    0600 (they used to be 0777 and 0644: every local user read every command)."""
    from tests.http.conftest import TestClient

    path = tmp_path / "state" / "ghostrunner.db"
    old = os.umask(0)
    try:
        app = create_app(Settings(executor="fake", database=path, admin_token="a" * 20),
                         announce=lambda secret: None)
        with TestClient(app) as client:
            assert client.get("/").status_code == 200
            modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode))
                     for p in (path.parent, *path.parent.iterdir())}
    finally:
        os.umask(old)
    assert modes == {"state": "0o700", "ghostrunner.db": "0o600", "ghostrunner.db-wal": "0o600",
                     "ghostrunner.db-shm": "0o600", "ghostrunner.db.lock": "0o600"}


def test_connection_limits_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'executor = "fake"\n[server]\nheader_timeout = 5\n'
                           "max_connections = 200\n")
    s = load_settings(path, {"GHOSTRUNNER_SERVER_BODY_TIMEOUT": "30.5"})
    assert (s.header_timeout, s.body_timeout, s.max_connections) == (5.0, 30.5, 200)


def test_the_connection_cap_leaves_descriptors_free() -> None:
    from ghostrunner_http._guard import FD_RESERVE, connection_limit

    assert connection_limit(1000, None) == 1000
    assert connection_limit(1000, 1024) == 1024 - FD_RESERVE
    assert connection_limit(1000, 64) == 64 - FD_RESERVE
    assert connection_limit(10, 64) == 10
    assert connection_limit(1000, 8) == 1  # hopeless, but still serves
