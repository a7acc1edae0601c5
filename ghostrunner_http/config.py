"""The server's settings: one frozen object, read from a TOML file and ``GHOSTRUNNER_*``
environment variables only at the edge (the ``ghostrunner serve`` command).

Precedence, lowest first: built-in defaults, the TOML file, environment variables,
command-line flags. Every TOML key has an environment variable: a top-level key ``k`` is
``GHOSTRUNNER_K``, a key ``k`` of section ``[s]`` is ``GHOSTRUNNER_S_K`` (for example
``[meshcentral] url`` is ``GHOSTRUNNER_MESHCENTRAL_URL``). See ``docs/http-api.md``.

Example::

    database = "/var/lib/ghostrunner/ghostrunner.db"
    executor = "meshcentral"

    [server]
    host = "0.0.0.0"
    port = 8443
    tls_cert = "/etc/ghostrunner/cert.pem"
    tls_key = "/etc/ghostrunner/key.pem"

    [meshcentral]
    url = "wss://mesh.example.com"
    user = "~t:AbCdEf"            # a MeshCentral login token user, or a user name
    password_file = "/etc/ghostrunner/mesh-password"

    [[webhooks]]                  # signed events POSTed to a receiver (any number)
    url = "https://hooks.example.com/ghostrunner"
    secret_file = "/etc/ghostrunner/webhook-secret"   # whsec_... (or secret, secret_env)
    events = ["run.*", "task.created"]
"""

from __future__ import annotations

import base64
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from ghostrunner import LoopSettings, RetryPolicy

from ._logging import redact_url
from ._webhooks import DeliveryPolicy, Webhook, check_url, derive_name, parse_secret

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "FakeDevice",
    "Settings",
    "env_var",
    "is_postgres_url",
    "load_settings",
    "sqlite_path",
]

ENV_PREFIX = "GHOSTRUNNER_"
MIN_ADMIN_TOKEN = 16
DEFAULT_FAKE_DEVICES: tuple[str, ...] = ("node-001", "node-002", "node-003")

#: Environment variables read by the operator commands, not by the server.
CLIENT_ENV = frozenset({"GHOSTRUNNER_URL", "GHOSTRUNNER_TOKEN", "GHOSTRUNNER_CONFIG",
                        "GHOSTRUNNER_CACERT", "GHOSTRUNNER_INSECURE",
                        "GHOSTRUNNER_MIGRATE_FROM", "GHOSTRUNNER_MIGRATE_TO"})


class ConfigError(ValueError):
    """A setting that cannot be used. ``key`` is its TOML name (``section.key``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@attrs.frozen(kw_only=True)
class FakeDevice:
    """A device of the ``fake`` executor (for trying the API without MeshCentral)."""

    nodeid: str
    name: str = ""
    online: bool = True
    group: str | None = None
    """The device group's name (its id is ``mesh//<name>``)."""
    tags: tuple[str, ...] = ()
    os: str | None = None


Executor = Literal["meshcentral", "fake"]


@attrs.frozen(kw_only=True)
class Settings:
    """Everything ``ghostrunner serve`` and :func:`~ghostrunner_http.create_app` need.

    Secrets (``admin_token``, ``meshcentral_password``) never appear in the repr.

    Args:
        database: the SQLite database file (created on first start). Unused when
            ``database_url`` is set.
        database_url: a PostgreSQL URL (``postgresql://user:password@host/db``): the
            tasks are kept there (:class:`ghostrunner.postgres.PostgresStore`) instead of
            in SQLite. The TOML key ``database`` (``GHOSTRUNNER_DATABASE``, ``--database``)
            sets this field when its value is such a URL, else ``database``. Its password
            never appears in the repr or the log.
        database_synchronous: SQLite only. ``FULL`` (default: a finished request survives
            a power loss) or ``NORMAL`` (faster writes; survives a crash of the process,
            but a power loss may lose the last moments, and a command could then run
            twice). PostgreSQL's durability is the server's (``synchronous_commit``).
        database_pool_min, database_pool_max: PostgreSQL only: the connections the pool
            keeps open, and the most it opens under load.
        executor: ``meshcentral`` (default), or ``fake`` to try the API without a
            MeshCentral server: simulated devices, always online, whose commands just
            echo themselves and exit 0.
        admin_token: the bootstrap admin token's secret (at least 16 characters).
            Unset: the token stored at the first start is kept, or one is generated
            and printed once.
        host, port: where the server listens.
        tls_cert, tls_key: PEM files; both or neither. With them the server speaks HTTPS.
        max_body_bytes: the largest request body accepted (larger: 413).
        header_timeout: seconds a client may take to send a request's line and headers
            (from when it connects, or from the previous answer); then the connection is
            closed (408 if part of a request came).
        body_timeout: seconds a client may take to send a request's body, after its
            head, however it trickles in; then 408 and the connection is closed.
        max_connections: client connections open at once; lowered to leave 32 file
            descriptors free under the process's limit (``ulimit -n``). Over it, the
            oldest connection waiting for a request is closed to make room (or the new
            one is refused with a 503 when every connection has a request in progress).
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        access_log: log one line per request.
        meshcentral_url: ``wss://host[:port]`` of the MeshCentral server.
        meshcentral_user: a MeshCentral user, or a login token's ``~t:...`` user name.
        meshcentral_password: that user's password or the login token's password.
        meshcentral_ignore_ssl: accept a self-signed MeshCentral certificate.
        meshcentral_group_id: only manage the devices of this group (``mesh//...``).
        fake_devices: the ``fake`` executor's devices.
        loop: tuning of the reconcile loop (:class:`ghostrunner.LoopSettings`), its
            runner lease included (``[runner]`` ``lease``, ``heartbeat``,
            ``adopt_grace``: used on PostgreSQL, where several runners may share one
            database).
        runner_name: what this server is called among the runners sharing its database
            (``GET /``, ``ghostrunner runners``); default ``host:pid``.
        audit_retention_days: audit log entries older than this are pruned (at start,
            then every 6 hours).
        max_streams: event streams (``GET /events``, the console's live updates) open
            at once; counted apart from ``max_connections`` (503 beyond).
        stream_heartbeat: seconds between keep-alive comments on a quiet event stream
            (below the idle timeout of any proxy in front).
        stream_send_timeout: seconds an event stream's client may take to take one
            write; then it is dropped (it reconnects with ``Last-Event-ID``).
        events_retention_days: events older than this are pruned (at start, then every
            hour); a client resuming from an older event misses what was pruned.
        webhooks: the receivers of signed events (``[[webhooks]]`` tables); their
            secrets never appear in the repr.
        webhook_policy: how their outbox is worked (``[webhook_delivery]``: retries,
            concurrency, retention).
    """

    database: Path = Path("ghostrunner.db")
    database_url: str | None = attrs.field(
        default=None, repr=lambda url: repr(None if url is None else redact_url(url))
    )
    database_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    database_pool_min: int = 1
    database_pool_max: int = 10
    executor: Executor = "meshcentral"
    admin_token: str | None = attrs.field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_body_bytes: int = 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000
    log_level: str = "info"
    access_log: bool = True
    meshcentral_url: str | None = attrs.field(
        default=None, repr=lambda url: repr(None if url is None else redact_url(url))
    )
    meshcentral_user: str | None = None
    meshcentral_password: str | None = attrs.field(default=None, repr=False)
    meshcentral_ignore_ssl: bool = False
    meshcentral_group_id: str | None = None
    fake_devices: tuple[FakeDevice, ...] = tuple(
        FakeDevice(nodeid=n, name=n) for n in DEFAULT_FAKE_DEVICES
    )
    loop: LoopSettings = attrs.field(factory=LoopSettings)
    runner_name: str | None = None
    audit_retention_days: int = 90
    max_streams: int = 100
    stream_heartbeat: float = 15.0
    stream_send_timeout: float = 30.0
    events_retention_days: float = 7.0
    webhooks: tuple[Webhook, ...] = ()
    webhook_policy: DeliveryPolicy = attrs.field(factory=DeliveryPolicy)

    def __attrs_post_init__(self) -> None:
        if self.database_synchronous not in ("FULL", "NORMAL"):
            raise ConfigError("database_synchronous", "must be FULL or NORMAL")
        if self.database_url is not None and not is_postgres_url(self.database_url):
            raise ConfigError("database", "must be a postgresql:// URL or a file path")
        if not 0 <= self.database_pool_min <= 1000:
            raise ConfigError("database_pool_min", "must be between 0 and 1000")
        if not 1 <= self.database_pool_max <= 1000:
            raise ConfigError("database_pool_max", "must be between 1 and 1000")
        if self.database_pool_min > self.database_pool_max:
            raise ConfigError("database_pool_min", "must not be over database_pool_max")
        if self.executor not in ("meshcentral", "fake"):
            raise ConfigError("executor", f"must be 'meshcentral' or 'fake', not {self.executor!r}")
        if self.admin_token is not None and len(self.admin_token) < MIN_ADMIN_TOKEN:
            raise ConfigError("admin_token", f"must be at least {MIN_ADMIN_TOKEN} characters")
        if not 0 <= self.port <= 65535:
            raise ConfigError("server.port", "must be between 0 and 65535")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("server.tls_cert", "tls_cert and tls_key go together")
        if self.max_body_bytes < 1024:
            raise ConfigError("server.max_body_bytes", "must be at least 1024")
        for key, seconds in (("server.header_timeout", self.header_timeout),
                             ("server.body_timeout", self.body_timeout)):
            if not 0 < seconds <= 3600:  # also refuses NaN
                raise ConfigError(key, "must be a number of seconds > 0 and <= 3600")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ConfigError("server.max_connections", "must be between 1 and 1000000")
        if self.runner_name is not None and not 0 < len(self.runner_name.strip()) <= 200:
            raise ConfigError("runner.name", "must be 1 to 200 characters")
        if not 1 <= self.audit_retention_days <= 100_000:
            raise ConfigError("audit.retention_days", "must be between 1 and 100000")
        if not 1 <= self.max_streams <= 100_000:
            raise ConfigError("server.max_streams", "must be between 1 and 100000")
        for key, seconds in (("server.stream_heartbeat", self.stream_heartbeat),
                             ("server.stream_send_timeout", self.stream_send_timeout)):
            if not 0 < seconds <= 3600:  # also refuses NaN
                raise ConfigError(key, "must be a number of seconds > 0 and <= 3600")
        if not 0 < self.events_retention_days <= 100_000:
            raise ConfigError("events.retention_days", "must be > 0 and <= 100000")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError("server.log_level", "must be debug, info, warning or error")
        if self.executor == "meshcentral":
            for key, value in (
                ("meshcentral.url", self.meshcentral_url),
                ("meshcentral.user", self.meshcentral_user),
                ("meshcentral.password", self.meshcentral_password),
            ):
                if not value:
                    raise ConfigError(
                        key,
                        f"is required with executor = \"meshcentral\" (set it in the config "
                        f"file or {env_var(key)}; or set executor = \"fake\" to try the API "
                        f"without MeshCentral)",
                    )
            url = self.meshcentral_url or ""
            if not url.startswith(("wss://", "ws://")):
                raise ConfigError("meshcentral.url", "must start with wss:// (or ws://)")

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values in these settings (for log redaction): the admin token, the
        MeshCentral password, and the passwords written in the MeshCentral and
        PostgreSQL URLs."""
        in_url = urllib.parse.urlsplit(self.meshcentral_url or "").password
        in_db = _url_password(self.database_url or "")
        hooks = [form for hook in self.webhooks for form in _secret_forms(hook.key)]
        return tuple(
            s for s in (self.admin_token, self.meshcentral_password, in_url, *in_db, *hooks)
            if s
        )

    @property
    def store_kind(self) -> Literal["postgresql", "sqlite"]:
        """Where the tasks are kept: ``postgresql`` or ``sqlite``."""
        return "postgresql" if self.database_url else "sqlite"

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self.tls_cert else "http"


def _secret_forms(key: bytes) -> tuple[str, ...]:
    """How a webhook's secret may be written (for log redaction): its base64, with and
    without padding (the ``whsec_`` form contains them)."""
    encoded = base64.b64encode(key).decode()
    return (encoded, encoded.rstrip("="))


# --------------------------------------------------------------------------- databases

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(text: str) -> bool:
    """Whether ``text`` names a PostgreSQL database (``postgresql://`` or
    ``postgres://``)."""
    return text.strip().lower().startswith(_POSTGRES_SCHEMES)


def sqlite_path(text: str) -> Path:
    """The file of a SQLite database given as a path or a ``sqlite:///path`` URL (the
    path after ``sqlite://`` is absolute, as in a ``file:`` URL; the four-slash form
    ``sqlite:////abs/path`` is taken alike)."""
    if text[:9].lower() == "sqlite://":
        rest = urllib.parse.unquote(text[9:])
        if not rest.startswith("/") or rest == "/":
            raise ValueError("a sqlite URL is sqlite:///path/to/file.db")
        return Path("/" + rest.lstrip("/"))
    return Path(text).expanduser()


def _url_password(url: str) -> tuple[str, ...]:
    """The password of a PostgreSQL URL, as written and decoded (both may be logged by
    something that prints the URL or the connection's parameters)."""
    try:
        parts = urllib.parse.urlsplit(url)
        raw = parts.netloc.rpartition("@")[0].partition(":")[2] if "@" in parts.netloc else ""
        query = urllib.parse.parse_qs(parts.query)
    except ValueError:
        return ()
    found = [raw, urllib.parse.unquote(raw), *query.get("password", [])]
    return tuple(dict.fromkeys(p for p in found if p))


# --------------------------------------------------------------------------- loading


def env_var(key: str) -> str:
    """The environment variable of a TOML key: ``meshcentral.url`` ->
    ``GHOSTRUNNER_MESHCENTRAL_URL``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "must be a string")
    return value


def _opt_str(key: str, value: Any) -> str | None:
    text = _str(key, value)
    return text or None


def _path(key: str, value: Any) -> Path:
    text = _str(key, value)
    if not text:
        raise ConfigError(key, "must not be empty")
    return Path(text).expanduser()


def _int(key: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(key, f"must be an integer, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, "must be an integer")
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(key, f"must be a number, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, "must be a number")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(key, "must be a finite number >= 0")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(key, f"must be true or false, not {value!r}")
    if not isinstance(value, bool):
        raise ConfigError(key, "must be true or false")
    return value


def _devices(key: str, value: Any) -> tuple[FakeDevice, ...]:
    if isinstance(value, str):  # environment: "node-001,node-002=Name"
        items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(key, "must be a list of node ids or {nodeid, name, ...} tables")
    out: list[FakeDevice] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            node, _, name = item.partition("=")
            if not node.strip():
                raise ConfigError(where, "must be a non-empty node id")
            out.append(FakeDevice(nodeid=node.strip(), name=name.strip() or node.strip()))
        elif isinstance(item, dict):
            extra = set(item) - {"nodeid", "name", "online", "group", "tags", "os"}
            if extra:
                raise ConfigError(f"{where}.{sorted(extra)[0]}", "unknown key")
            node = _str(f"{where}.nodeid", item.get("nodeid", ""))
            if not node.strip():
                raise ConfigError(f"{where}.nodeid", "is required")
            tags = item.get("tags", [])
            if not isinstance(tags, list):
                raise ConfigError(f"{where}.tags", "must be a list of strings")
            out.append(
                FakeDevice(
                    nodeid=node,
                    name=_str(f"{where}.name", item.get("name", node)),
                    online=_bool(f"{where}.online", item.get("online", True)),
                    group=_opt_str(f"{where}.group", item.get("group", "")),
                    tags=tuple(_str(f"{where}.tags[{j}]", t) for j, t in enumerate(tags)),
                    os=_opt_str(f"{where}.os", item.get("os", "")),
                )
            )
        else:
            raise ConfigError(where, "must be a node id or a {nodeid, name, ...} table")
    return tuple(out)


def _database(key: str, value: Any) -> Path | str:
    """A PostgreSQL URL (kept as text), or a SQLite file (a path or sqlite:///path)."""
    text = _str(key, value).strip()
    if not text:
        raise ConfigError(key, "must not be empty")
    if is_postgres_url(text):
        return text
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*)://", text)
    if scheme is not None and scheme.group(1).lower() != "sqlite":
        # the scheme only: the rest may hold a password
        raise ConfigError(key, f"must be a postgresql:// URL, a sqlite:/// URL or a file "
                               f"path (not a {scheme.group(1)!r} URL)")
    try:
        return sqlite_path(text)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _executor(key: str, value: Any) -> str:
    text = _str(key, value).strip().lower()
    if text not in ("meshcentral", "fake"):
        raise ConfigError(key, f"must be 'meshcentral' or 'fake', not {value!r}")
    return text


def _synchronous(key: str, value: Any) -> str:
    text = _str(key, value).strip().upper()
    if text not in ("FULL", "NORMAL"):
        raise ConfigError(key, f"must be FULL or NORMAL, not {value!r}")
    return text


def _log_level(key: str, value: Any) -> str:
    return _str(key, value).strip().lower()


def _seconds_list(key: str, value: Any) -> tuple[float, ...]:
    """A list of seconds (TOML array, or ``"5, 300, 1800"`` from the environment)."""
    if isinstance(value, str):
        items: list[Any] = [v for v in value.replace(",", " ").split()]
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(key, "must be a list of seconds")
    if not items:
        raise ConfigError(key, "must list at least one delay")
    return tuple(_float(f"{key}[{i}]", v) for i, v in enumerate(items))


# TOML key -> (Settings field, parser). ``*_file`` keys read a secret from a file.
_Parser = Callable[[str, Any], Any]
_KEYS: dict[str, tuple[str, _Parser]] = {
    "database": ("database", _database),
    "database_synchronous": ("database_synchronous", _synchronous),
    "database_pool_min": ("database_pool_min", _int),
    "database_pool_max": ("database_pool_max", _int),
    "executor": ("executor", _executor),
    "admin_token": ("admin_token", _opt_str),
    "server.host": ("host", _str),
    "server.port": ("port", _int),
    "server.tls_cert": ("tls_cert", _path),
    "server.tls_key": ("tls_key", _path),
    "server.max_body_bytes": ("max_body_bytes", _int),
    "server.header_timeout": ("header_timeout", _float),
    "server.body_timeout": ("body_timeout", _float),
    "server.max_connections": ("max_connections", _int),
    "server.log_level": ("log_level", _log_level),
    "server.access_log": ("access_log", _bool),
    "meshcentral.url": ("meshcentral_url", _opt_str),
    "meshcentral.user": ("meshcentral_user", _opt_str),
    "meshcentral.password": ("meshcentral_password", _opt_str),
    "meshcentral.ignore_ssl": ("meshcentral_ignore_ssl", _bool),
    "meshcentral.group_id": ("meshcentral_group_id", _opt_str),
    "fake.devices": ("fake_devices", _devices),
    "audit.retention_days": ("audit_retention_days", _int),
    "server.max_streams": ("max_streams", _int),
    "server.stream_heartbeat": ("stream_heartbeat", _float),
    "server.stream_send_timeout": ("stream_send_timeout", _float),
    "events.retention_days": ("events_retention_days", _float),
    "runner.name": ("runner_name", _opt_str),
}
_SECRET_FILES: dict[str, str] = {
    "admin_token_file": "admin_token",
    "meshcentral.password_file": "meshcentral.password",
}
_LOOP_KEYS: dict[str, _Parser] = {
    "loop.max_in_flight": _int,
    "loop.resync_interval": _float,
    "loop.retry_base": _float,
    "loop.retry_cap": _float,
    "loop.dispatch_grace": _float,
    "loop.shutdown_grace": _float,
    "loop.output_limit": _int,
    "loop.events_poll": _float,
    # the runner's lease (LoopSettings' too, in a section of their own)
    "runner.lease": _float,
    "runner.heartbeat": _float,
    "runner.adopt_grace": _float,
}

#: ``[webhook_delivery]`` keys: DeliveryPolicy fields
_DELIVERY_KEYS: dict[str, tuple[str, _Parser]] = {
    "webhook_delivery.retry_schedule": ("schedule", _seconds_list),
    "webhook_delivery.jitter": ("jitter", _float),
    "webhook_delivery.max_attempts": ("max_attempts", _int),
    "webhook_delivery.max_age": ("max_age", _float),
    "webhook_delivery.concurrency": ("concurrency", _int),
    "webhook_delivery.retention_days": ("retention_days", _float),
    "webhook_delivery.failed_retention_days": ("failed_retention_days", _float),
    "webhook_delivery.poll_interval": ("poll_interval", _float),
}
#: the keys of a ``[[webhooks]]`` table
WEBHOOK_KEYS = ("name", "url", "secret", "secret_file", "secret_env", "events", "timeout",
                "concurrency")

#: Every key the TOML file may hold (``section.key``), for documentation and errors.
#: (``[[webhooks]]`` tables, an array, are only read from the file: see WEBHOOK_KEYS.)
KNOWN_KEYS: tuple[str, ...] = (*_KEYS, *_SECRET_FILES, *_LOOP_KEYS, *_DELIVERY_KEYS)


def _flatten(doc: Mapping[str, Any]) -> dict[str, Any]:
    sections = {k.split(".")[0] for k in KNOWN_KEYS if "." in k}
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "webhooks":  # an array of tables, read by _webhooks()
            flat[key] = value
        elif key in sections:
            if not isinstance(value, dict):
                raise ConfigError(key, "must be a table ([" + key + "])")
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    for key in flat:
        if key not in KNOWN_KEYS and key != "webhooks":
            raise ConfigError(key, "unknown setting (known: " + ", ".join(KNOWN_KEYS) + ")")
    return flat


def _webhooks(value: Any, env: Mapping[str, str]) -> tuple[Webhook, ...]:
    """The ``[[webhooks]]`` tables. A secret comes from exactly one of ``secret``,
    ``secret_file`` (a file holding it) or ``secret_env`` (the name of an environment
    variable holding it); no error message ever repeats it."""
    if not isinstance(value, list):
        raise ConfigError("webhooks", "must be [[webhooks]] tables (an array of tables)")
    out: list[Webhook] = []
    names: dict[str, int] = {}
    for i, table in enumerate(value):
        where = f"webhooks[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table ([[webhooks]])")
        for key in table:
            if key not in WEBHOOK_KEYS:
                raise ConfigError(f"{where}.{key}", "unknown key (known: "
                                  + ", ".join(WEBHOOK_KEYS) + ")")
        url = _str(f"{where}.url", table.get("url", "")).strip()
        problem = check_url(url)
        if problem is not None:
            raise ConfigError(f"{where}.url", problem)
        given = [k for k in ("secret", "secret_file", "secret_env") if k in table]
        if len(given) != 1:
            raise ConfigError(f"{where}.secret", "give exactly one of secret, secret_file "
                              "or secret_env (the secret is whsec_ followed by base64)")
        source = given[0]
        if source == "secret":
            secret = _str(f"{where}.secret", table["secret"])
        elif source == "secret_file":
            secret = _read_secret_file(f"{where}.secret_file", table["secret_file"])
        else:
            var = _str(f"{where}.secret_env", table["secret_env"]).strip()
            if not var or var not in env:
                raise ConfigError(f"{where}.secret_env",
                                  f"the environment variable {var!r} is not set")
            secret = env[var]
        try:
            key = parse_secret(secret.strip())
        except ValueError as exc:
            raise ConfigError(f"{where}.{source}", str(exc)) from None
        events = table.get("events", ["*"])
        if isinstance(events, str):
            events = [events]
        if not isinstance(events, list) or not events:
            raise ConfigError(f"{where}.events", "must be a list of event kinds or globs "
                              "(\"run.*\"); leave it out for every event")
        name = _str(f"{where}.name", table.get("name", derive_name(url))).strip()
        fields: dict[str, Any] = {
            "name": name, "url": url, "key": key,
            "events": tuple(_str(f"{where}.events[{j}]", e).strip()
                            for j, e in enumerate(events)),
        }
        if "timeout" in table:
            fields["timeout"] = _float(f"{where}.timeout", table["timeout"])
        if "concurrency" in table:
            fields["concurrency"] = _int(f"{where}.concurrency", table["concurrency"])
        try:
            hook = Webhook(**fields)
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0].rstrip(":")
            field = field if field in WEBHOOK_KEYS else "url"
            raise ConfigError(f"{where}.{field}", str(exc)) from None
        if hook.name in names:
            raise ConfigError(f"{where}.name", f"webhooks[{names[hook.name]}] is named "
                              f"{hook.name!r} too: give each webhook its own name")
        names[hook.name] = i
        out.append(hook)
    return tuple(out)


def _read_secret_file(key: str, value: Any) -> str:
    path = _path(key, value)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    return text.rstrip("\r\n")


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from a TOML file, the environment and overrides.

    Args:
        path: the TOML file, or None for none.
        env: the environment (``GHOSTRUNNER_*`` variables are read from it).
        overrides: TOML-style keys (``server.port``) given on the command line.

    Raises:
        ConfigError: naming the setting, for an unreadable file or an invalid value.
    """
    layers: list[dict[str, Any]] = []
    if path is not None:
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
        layers.append(_flatten(doc))
    if env is not None:
        layers.append({key: env[env_var(key)] for key in KNOWN_KEYS if env_var(key) in env})
    layers.append(dict(overrides or {}))

    raw: dict[str, Any] = {}
    for layer in layers:
        # within one layer a secret given directly wins over its *_file; a later layer
        # (environment over file) wins either way
        for file_key, secret_key in _SECRET_FILES.items():
            if file_key in layer:
                value = layer.pop(file_key)
                if secret_key not in layer:
                    layer[secret_key] = _read_secret_file(file_key, value)
        raw.update(layer)

    fields: dict[str, Any] = {}
    for key, (field, parse) in _KEYS.items():
        if key in raw:
            fields[field] = parse(key, raw[key])
    if isinstance(fields.get("database"), str):  # a PostgreSQL URL
        fields["database_url"] = fields.pop("database")
    loop: dict[str, Any] = {}
    for key, parse in _LOOP_KEYS.items():
        if key in raw:
            loop[key.split(".", 1)[1]] = parse(key, raw[key])
    for key in ("resync_interval", "retry_base", "retry_cap", "events_poll"):
        if key in loop and not loop[key] > 0:
            raise ConfigError(f"loop.{key}", "must be > 0")
    for key in ("lease", "heartbeat"):
        if key in loop and not 0 < loop[key] <= 3600:
            raise ConfigError(f"runner.{key}", "must be a number of seconds > 0 and <= 3600")
    if "adopt_grace" in loop and not 0 <= loop["adopt_grace"] <= 3600:
        raise ConfigError("runner.adopt_grace", "must be a number of seconds >= 0 and <= 3600")
    lease = float(loop.get("lease", LoopSettings().lease))
    if "heartbeat" in loop and loop["heartbeat"] > lease / 2:
        raise ConfigError("runner.heartbeat", f"must be at most half of runner.lease "
                          f"({lease:g} s): a renewal may fail once without fencing the runner")
    if loop.get("output_limit", 2) < 2:
        raise ConfigError("loop.output_limit", "must be at least 2")
    retry = {part: loop.pop(f"retry_{part}") for part in ("base", "cap") if f"retry_{part}" in loop}
    if retry:
        loop["retry"] = RetryPolicy(**retry)
    try:
        fields["loop"] = LoopSettings(**loop)
    except (ValueError, TypeError) as exc:
        raise ConfigError("loop", str(exc)) from None
    if "webhooks" in raw:
        fields["webhooks"] = _webhooks(raw["webhooks"], os.environ if env is None else env)
    policy: dict[str, Any] = {}
    for key, (field, parse) in _DELIVERY_KEYS.items():
        if key in raw:
            policy[field] = parse(key, raw[key])
    try:
        fields["webhook_policy"] = DeliveryPolicy(**policy)
    except ValueError as exc:
        named = next((k for k, (f, _) in _DELIVERY_KEYS.items() if str(exc).startswith(f)),
                     "webhook_delivery")
        raise ConfigError(named, str(exc)) from None
    return Settings(**fields)


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """``GHOSTRUNNER_*`` variables that no setting reads (probably typos)."""
    known = {env_var(k) for k in KNOWN_KEYS} | CLIENT_ENV
    return sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
