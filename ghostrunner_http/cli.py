"""The ``ghostrunner`` command: ``serve`` runs the server; ``tasks``, ``tokens`` and
``devices`` are an operator's client of its HTTP API; ``lab`` runs a local MeshCentral
sandbox (see ``_lab_cmd``); ``db migrate`` copies a SQLite database into PostgreSQL (see
``_db_cmd``).

Exit status: 0 success (``tasks watch``: Ctrl-C too); 1 ``tasks wait``/``--wait``/``tasks
watch TASK_ID``: a run did not succeed; 2 usage or configuration error; 3 the server
answered with an error or could not be reached (``serve``: could not start); 124 ``wait``
timed out.

What the server sends (task names, commands, device output, device names, error
messages) is anyone's text: printed for a human, its control characters are shown
(``\x1b``), never sent to the terminal, where an escape sequence could clear the screen,
rewrite lines or set the window title (:func:`terminal_safe`). ``--json`` prints the
data as it is, in JSON (which escapes them).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs

from ghostrunner import Delivery, RunState, Shell, TaskStatus
from ghostrunner.tokens import Scope

from ._client import ApiClient, ApiFailure, Unreachable
from ._db_cmd import add_db_parser
from ._lab_cmd import add_lab_parser
from .config import KNOWN_KEYS, ConfigError, Settings, env_var, load_settings, unknown_env

__all__ = ["main"]

log = logging.getLogger("ghostrunner.serve")

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_API, EXIT_TIMEOUT = 0, 1, 2, 3, 124

SERVE_HELP = """\
Run the GhostRunner HTTP API server (uvicorn) with its reconcile loop.

Configuration comes from a TOML file (--config, or GHOSTRUNNER_CONFIG) and GHOSTRUNNER_*
environment variables, which win over the file; the flags below win over both. Tasks
are kept in an embedded SQLite database (database = "ghostrunner.db" by default), or in
PostgreSQL with database = "postgresql://user:password@host/db" (the password is never
logged; 'ghostrunner db migrate' copies a SQLite database there).

Point it at your MeshCentral server (executor = "meshcentral", the default):

    # ghostrunner.toml
    database = "/var/lib/ghostrunner/ghostrunner.db"

    [server]
    host = "0.0.0.0"
    port = 8080

    [meshcentral]
    url = "wss://mesh.example.com"          # your MeshCentral address (wss://host[:port])
    user = "ghostrunner"                     # a MeshCentral user, or a login token's ~t:...
    password_file = "/etc/ghostrunner/mesh-password"
    # ignore_ssl = true                      # only for a self-signed MeshCentral certificate
    # group_id = "mesh//..."                 # only manage this device group

or with the environment alone:

    GHOSTRUNNER_MESHCENTRAL_URL=wss://mesh.example.com \\
    GHOSTRUNNER_MESHCENTRAL_USER=ghostrunner \\
    GHOSTRUNNER_MESHCENTRAL_PASSWORD=... ghostrunner serve

The server starts even when MeshCentral is unreachable: tasks queue, and it keeps
reconnecting. To try the API without MeshCentral, use executor = "fake" (simulated
devices node-001..node-003, always online, whose commands echo and exit 0).

At the first start an admin token is generated and printed once (or set admin_token /
GHOSTRUNNER_ADMIN_TOKEN). SIGTERM or Ctrl-C stops it gracefully.

Signed webhooks (Standard Webhooks) are [[webhooks]] tables of the config file:

    [[webhooks]]
    url = "https://hooks.example.com/ghostrunner"
    secret_file = "/etc/ghostrunner/webhook-secret"   # whsec_...; or secret, secret_env
    events = ["run.*"]                                # default: every event

and [webhook_delivery] tunes their retries (docs/operations.md, "Webhooks").
"""


def _serve_epilog() -> str:
    lines = ["settings (TOML key -> environment variable):"]
    for key in KNOWN_KEYS:
        lines.append(f"  {key:28} {env_var(key)}")
    lines.append("see docs/http-api.md for what each one does.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- serve


def _install_quiet_signal_handlers() -> None:
    # uvicorn handles SIGINT/SIGTERM while it runs, and once shut down re-raises the
    # signal it caught under the handlers that were there before it. With these no-op
    # handlers that re-raise does nothing, and a graceful stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for flag, key in (("host", "server.host"), ("port", "server.port"),
                      ("database", "database"), ("executor", "executor"),
                      ("log_level", "server.log_level")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    config = args.config or os.environ.get("GHOSTRUNNER_CONFIG")
    try:
        settings = load_settings(Path(config) if config else None, os.environ, overrides)
    except ConfigError as exc:
        print(f"ghostrunner serve: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return serve(settings)


def _base_url(settings: Settings, bound: Any) -> str:
    """Where a browser on this machine reaches the server: its scheme, host and port
    (a wildcard address is shown as the loopback one)."""
    scheme = "https" if settings.tls_cert else "http"
    host, port = bound[0], bound[1]
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a comparison, not a bind
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT. Returns the exit status."""
    import uvicorn

    from ._guard import (
        FD_RESERVE,
        ConnectionGuard,
        GuardedListener,
        connection_limit,
        fd_soft_limit,
        guarded_protocol,
    )
    from ._logging import configure_logging, redact_url
    from .app import create_app

    configure_logging(settings.log_level, settings.secrets)
    for name in unknown_env(os.environ):
        log.warning("ignoring %s: no setting has this name", name)
    if settings.database_url is not None:
        log.info("database: PostgreSQL %s (pool %d-%d connections)",
                 redact_url(settings.database_url), settings.database_pool_min,
                 settings.database_pool_max)
    else:
        log.info("database: %s", redact_url(str(settings.database.expanduser().resolve())))
    if settings.executor == "meshcentral":
        log.info("MeshCentral: %s as %s%s", redact_url(settings.meshcentral_url or ""),
                 settings.meshcentral_user,
                 " (certificate not verified)" if settings.meshcentral_ignore_ssl else "")
    else:
        log.info("executor: fake (%d simulated devices; no MeshCentral)",
                 len(settings.fake_devices))
    # event streams have sockets of their own, on top of max_connections; under a low
    # descriptor limit they get a quarter of what there is at most
    sockets = connection_limit(settings.max_connections + settings.max_streams,
                               fd_soft_limit())
    streams = settings.max_streams
    if sockets < settings.max_connections + settings.max_streams:
        streams = max(1, min(settings.max_streams, sockets // 4))
        settings = attrs.evolve(settings, max_streams=streams)
    guard = ConnectionGuard(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_connections=max(1, min(settings.max_connections, sockets - streams)),
        max_streams=streams,
        stream_send_timeout=settings.stream_send_timeout,
    )
    if guard.max_connections < settings.max_connections:
        log.warning("at most %d client connections and %d event streams at once "
                    "(server.max_connections is %d): the file descriptor limit is %s "
                    "(ulimit -n), and %d are kept for the database and MeshCentral",
                    guard.max_connections, streams, settings.max_connections,
                    fd_soft_limit(), FD_RESERVE)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        # uvicorn's HTTP/1.1 protocol, with time limits on reading a request and a cap
        # on connections (see _guard); no WebSocket upgrades (the API has none)
        http=guarded_protocol(guard),
        ws="none",
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        log_config=None,
        access_log=settings.access_log,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=int(settings.loop.shutdown_grace) + 5,
    )
    server = uvicorn.Server(config)
    # bound here (uvicorn's way: it logs where it listens, or why it cannot and exits 3)
    # so that the guard's listener accepts the connections (see _guard)
    listener = GuardedListener.adopt(config.bind_socket(), guard)
    listener.set_inheritable(False)
    log.info("operator console: %s/ui/ (sign in with an API token)",
             _base_url(settings, listener.getsockname()))
    # Everything imported so far lives as long as the process: keep it out of the
    # cyclic collector's scans, and collect the young generation less often (a request
    # allocates a few hundred tracked objects; almost none form cycles). Measured on
    # POST /task/create: about a tenth less CPU per request.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    _install_quiet_signal_handlers()
    server.run(sockets=[listener])
    if not server.started:
        log.error("GhostRunner could not start (see above)")
        return EXIT_API
    log.info("GhostRunner stopped")
    return EXIT_OK


# --------------------------------------------------------------------------- output

#: C0 controls but newline and tab, DEL, C1 controls (U+0080-U+009F: a terminal may
#: take U+009B as CSI, like ESC [), and the bidirectional controls (U+061C, U+200E,
#: U+200F, U+202A-U+202E, U+2066-U+2069), which reorder what is shown ("Trojan
#: Source": a name can display as something other than what it is).
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{_BIDI}]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_safe(data: Any) -> Any:
    """``data`` (an answer: dicts, lists, strings...) with each control character of
    each string, but newline and tab, written as ``\\xNN`` (``\\uNNNN`` for the
    bidirectional ones)."""
    if isinstance(data, str):
        return _CONTROL.sub(_escaped, data)
    if isinstance(data, list):
        return [terminal_safe(item) for item in data]
    if isinstance(data, dict):
        return {terminal_safe(key): terminal_safe(value) for key, value in data.items()}
    return data


class _TerminalClient(ApiClient):
    """The client of human output: every answer comes back :func:`terminal_safe`."""

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return terminal_safe(super().call(method, path, **kwargs))


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out)


def _json(data: Any, out: TextIO) -> None:
    # JSON escapes C0 controls; C1 ones, DEL and bidi controls too, here (still the
    # same JSON value)
    text = json.dumps(data, indent=2, ensure_ascii=False)
    print(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text), file=out)


def _done(counts: Mapping[str, int]) -> int:
    return sum(n for state, n in counts.items() if RunState(state).terminal)


def _progress(task: Mapping[str, Any], elapsed: float) -> str:
    counts: Mapping[str, int] = task["counts"]
    total = sum(counts.values())
    done = _done(counts)
    width = 24
    filled = width * done // total if total else width
    parts = [f"{n} {state}" for state, n in counts.items() if n]
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done  "
            f"{', '.join(parts)}  {elapsed:.0f}s")


def _print_runs(runs: Sequence[Mapping[str, Any]], out: TextIO, *, output: bool) -> None:
    rows = [["NODE", "STATE", "EXIT", "ATTEMPTS", "FINISHED", "ERROR"]]
    for run in runs:
        # a recovered outcome says so where the state is read
        state = run["state"] + (" (recovered)" if run.get("recovered") else "")
        rows.append([
            run["nodeid"], state,
            "" if run["exit_code"] is None else str(run["exit_code"]),
            str(run["attempts"]), run["finished_at"] or "", run["error"] or "",
        ])
    _table(rows, out)
    if output:
        for run in runs:
            if run["output"]:
                cut = " (truncated)" if run["output_truncated"] else ""
                print(f"\n--- output of {run['nodeid']}{cut} ---", file=out)
                print(run["output"].rstrip("\n"), file=out)


# --------------------------------------------------------------------------- client commands


def _segment(text: str) -> str:
    """``text`` as one path segment (a task id with a "/", a space or a control
    character is still that id, and still a valid URL)."""
    return urllib.parse.quote(text, safe="")


def _client(args: argparse.Namespace, *, need_token: bool = True) -> ApiClient:
    token = args.token or os.environ.get("GHOSTRUNNER_TOKEN")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError("token", f"cannot read {args.token_file}: {exc.strerror}") from None
    if not token and need_token:
        raise ConfigError("token", "no API token: pass --token-file, or set GHOSTRUNNER_TOKEN")
    return (ApiClient if args.json else _TerminalClient)(
        args.url or os.environ.get("GHOSTRUNNER_URL") or DEFAULT_URL,
        token,
        cafile=args.cacert or os.environ.get("GHOSTRUNNER_CACERT"),
        insecure=args.insecure,
    )


def _selector(args: argparse.Namespace) -> dict[str, Any] | None:
    """``details.select`` from the selector flags of ``tasks add`` (None: none given)."""
    select: dict[str, Any] = {}
    for flag, key in (("group", "group"), ("tag", "tags"), ("os", "os"),
                      ("device_name", "name")):
        value = getattr(args, flag)
        if value is not None:
            select[key] = value
    if args.tags_mode is not None:
        select["tags_mode"] = args.tags_mode
    if args.all_devices:
        select["all"] = True
    return select or None


def _rollout(args: argparse.Namespace) -> dict[str, Any] | None:
    """``details.rollout`` from the rollout flags of ``tasks add`` (None: none given)."""
    rollout = {key: getattr(args, key) for key in ("max_concurrent", "per_minute",
                                                   "abort_failed_pct", "abort_min_finished")
               if getattr(args, key) is not None}
    return rollout or None


def _check_tasks_add(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.node and _selector(args) is None:
        parser.error("tasks add: give the devices: --node, or a selector (--group, --tag, "
                     "--os, --device-name, --all)")
    if args.continuous and _selector(args) is None:
        parser.error("tasks add: --continuous needs a selector (--group, --tag, --os, "
                     "--device-name or --all)")
    if args.tags_mode is not None and not args.tag:
        parser.error("tasks add: --tags-mode needs --tag")


def cmd_tasks_add(args: argparse.Namespace, out: TextIO) -> int:
    details: dict[str, Any] = {
        "name": args.name or args.command[:60].strip() or "task",
        "command": args.command,
    }
    if args.node:
        details["nodeids"] = args.node
    for key in ("shell", "timeout", "not_before", "expires_at", "max_attempts", "delivery"):
        value = getattr(args, key)
        if value is not None:
            details[key] = value
    if args.run_as_user:
        details["run_as_user"] = True
    select, rollout = _selector(args), _rollout(args)
    if select is not None:
        details["select"] = select
    if args.continuous:
        details["continuous"] = True
    if rollout is not None:
        details["rollout"] = rollout
    if args.success_exit_code:
        details["success_exit_codes"] = args.success_exit_code
    client = _client(args)
    task = client.call("POST", "/task/create", body={"details": details})
    if args.wait:
        print(f"queued task {task['id']} for {sum(task['counts'].values())} device(s)"
              + (" (and the devices that match later)" if task.get("continuous") else ""),
              file=sys.stderr)
        return _wait(client, task["id"], args, out)
    if args.json:
        _json(task, out)
    else:
        print(task["id"], file=out)
    return EXIT_OK


def cmd_tasks_list(args: argparse.Namespace, out: TextIO) -> int:
    client = _client(args)
    params = {"limit": args.limit, "state": args.state, "status": args.status,
              "nodeid": args.node, "name": args.name, "cursor": args.cursor}
    tasks: list[dict[str, Any]] = []
    while True:
        page = client.call("GET", "/task/list", params=params)
        tasks.extend(page["tasks"])
        if not args.all or page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    if args.json:
        _json({"tasks": tasks, "next_cursor": None if args.all else page["next_cursor"]}, out)
        return EXIT_OK
    rows = [["ID", "STATUS", "DONE", "CREATED", "NAME"]]
    for task in tasks:
        total = sum(task["counts"].values())
        rows.append([task["id"], task["status"], f"{_done(task['counts'])}/{total}",
                     task["creation"], task["name"]])
    _table(rows, out)
    if not args.all and page["next_cursor"]:
        print(f"(more: --cursor {page['next_cursor']}, or --all)", file=sys.stderr)
    return EXIT_OK


def _fetch_task(client: ApiClient, task_id: str, *, output: bool) -> dict[str, Any]:
    """``GET /tasks/{id}`` with every run: its pages followed (1,000 runs a page), with
    the runs' output if ``output``."""
    params = {"limit": 1000, "output": "true" if output else "false"}
    path = f"/tasks/{_segment(task_id)}"
    task: dict[str, Any] = client.call("GET", path, params=params)
    runs = list(task["runs"])
    cursor = task["runs_next_cursor"]
    while cursor is not None:
        page = client.call("GET", path, params={**params, "cursor": cursor})
        runs.extend(page["runs"])
        cursor = page["runs_next_cursor"]
    return {**task, "runs": runs, "runs_next_cursor": None}


def cmd_tasks_show(args: argparse.Namespace, out: TextIO) -> int:
    task = _fetch_task(_client(args), args.id, output=not args.no_output)
    if args.json:
        _json(task, out)
        return EXIT_OK
    for key in ("id", "name", "status", "command", "creation", "shell", "timeout",
                "delivery", "max_attempts", "not_before", "expires_at"):
        if task[key] is not None:
            print(f"{key + ':':14}{task[key]}", file=out)
    print(f"{'paused:':14}{'yes' if task['paused'] else 'no'}", file=out)
    if task["aborted"] is not None:
        print(f"{'aborted:':14}{task['aborted']}", file=out)
    if task["select"] is not None:
        print(f"{'select:':14}{_describe_select(task['select'])}"
              + (" (continuous)" if task["continuous"] else ""), file=out)
    limits = _describe_rollout(task["rollout"])
    if limits:
        print(f"{'rollout:':14}{limits}", file=out)
    if task["success_exit_codes"] != [0]:
        print(f"{'success on:':14}exit "
              + ", ".join(str(c) for c in task["success_exit_codes"]), file=out)
    print(file=out)
    _print_runs(task["runs"], out, output=not args.no_output)
    if args.attempts:
        _print_history(task["runs"], out, output=not args.no_output)
    return EXIT_OK


def _describe_select(select: Mapping[str, Any]) -> str:
    parts = ["all devices"] if select["all"] else []
    if select["group"]:
        parts.append(f"group={select['group']}")
    if select["tags"]:
        parts.append(f"tags({select['tags_mode']})={','.join(select['tags'])}")
    if select["os"]:
        parts.append(f"os~{select['os']}")
    if select["name"]:
        parts.append(f"name={select['name']}")
    return " AND ".join(parts)


def _describe_rollout(rollout: Mapping[str, Any]) -> str:
    parts = []
    if rollout["max_concurrent"] is not None:
        parts.append(f"at most {rollout['max_concurrent']} at once")
    if rollout["per_minute"] is not None:
        parts.append(f"at most {rollout['per_minute']} starts a minute")
    if rollout["abort_failed_pct"] is not None:
        parts.append(f"abort past {rollout['abort_failed_pct']:g}% failed (after "
                     f"{rollout['abort_min_finished']} finished)")
    return "; ".join(parts)


def _print_history(runs: Sequence[Mapping[str, Any]], out: TextIO, *, output: bool) -> None:
    for run in runs:
        print(f"\n--- attempts of {run['nodeid']} ---", file=out)
        rows = [["#", "STATE", "EXIT", "STARTED", "FINISHED", "ERROR"]]
        for attempt in run["history"]:
            rows.append([
                str(attempt["number"]), attempt["state"],
                "" if attempt["exit_code"] is None else str(attempt["exit_code"]),
                attempt["started_at"] or "", attempt["finished_at"] or "",
                attempt["error"] or "",
            ])
        if len(rows) == 1:
            print("(not sent yet)", file=out)
            continue
        _table(rows, out)
        if output:
            for attempt in run["history"]:
                if attempt["output"]:
                    cut = " (truncated)" if attempt["output_truncated"] else ""
                    print(f"-- output of attempt {attempt['number']}{cut} --", file=out)
                    print(attempt["output"].rstrip("\n"), file=out)


def _print_summary(task: Mapping[str, Any], out: TextIO) -> None:
    total = sum(task["counts"].values())
    print(f"task {task['id']} is {task['status']} ({_done(task['counts'])}/{total} done"
          + (", paused" if task["paused"] else "") + ")", file=out)


def _hold(verb: str) -> Callable[[argparse.Namespace, TextIO], int]:
    """``tasks pause`` or ``tasks resume``: the route of that name, then the task."""

    def command(args: argparse.Namespace, out: TextIO) -> int:
        task = _client(args).call("POST", f"/tasks/{_segment(args.id)}/{verb}")
        if args.json:
            _json(task, out)
        else:
            _print_summary(task, out)
        return EXIT_OK

    return command


cmd_tasks_pause = _hold("pause")
cmd_tasks_resume = _hold("resume")


def cmd_tasks_retry(args: argparse.Namespace, out: TextIO) -> int:
    body = {"states": args.state} if args.state else {}
    result = _client(args).call("POST", f"/tasks/{_segment(args.id)}/retry", body=body)
    if args.json:
        _json(result, out)
    else:
        print(f"retried {len(result['retried'])} run(s)"
              + (": " + ", ".join(result["retried"]) if result["retried"] else ""), file=out)
    return EXIT_OK


def cmd_tasks_abort(args: argparse.Namespace, out: TextIO) -> int:
    body = {"reason": args.reason} if args.reason is not None else {}
    result = _client(args).call("POST", f"/tasks/{_segment(args.id)}/abort", body=body)
    if args.json:
        _json(result, out)
    else:
        print(f"aborted task {result['id']}; cancelled {len(result['cancelled'])} pending "
              f"run(s)" + (": " + ", ".join(result["cancelled"]) if result["cancelled"]
                           else "") + "; runs in flight finish", file=out)
    return EXIT_OK


def cmd_tasks_cancel(args: argparse.Namespace, out: TextIO) -> int:
    body = {"nodeids": args.node} if args.node else {}
    result = _client(args).call("POST", f"/tasks/{_segment(args.id)}/cancel", body=body)
    if args.json:
        _json(result, out)
    else:
        print(f"cancelled {len(result['cancelled'])} pending run(s)"
              + (": " + ", ".join(result["cancelled"]) if result["cancelled"] else ""),
              file=out)
    return EXIT_OK


def cmd_tasks_delete(args: argparse.Namespace, out: TextIO) -> int:
    result = _client(args).call("DELETE", f"/tasks/{_segment(args.id)}")
    if args.json:
        _json(result, out)
        return EXIT_OK
    outcome = result["tasks"][0]
    if outcome["deleted"]:
        print(f"deleted task {outcome['id']}", file=out)
    else:
        print(f"task {outcome['id']} kept: run(s) in flight on "
              f"{', '.join(outcome['running'])}; its pending runs were cancelled", file=out)
    return EXIT_OK


def cmd_tasks_flush(args: argparse.Namespace, out: TextIO) -> int:
    if not args.yes:
        print("flush cancels every pending run and removes every finished task; "
              "add --yes to do it", file=sys.stderr)
        return EXIT_USAGE
    result = _client(args).call("DELETE", "/task/flush")
    if args.json:
        _json(result, out)
    else:
        print(f"cancelled {result['cancelled']} run(s), removed {result['deleted']} task(s), "
              f"kept {result['kept']} with runs in flight", file=out)
    return EXIT_OK


def _wait(client: ApiClient, task_id: str, args: argparse.Namespace, out: TextIO) -> int:
    start = time.monotonic()
    live = sys.stderr.isatty()
    last = ""
    while True:
        # the counts say it all: one run is the smallest page
        task = client.call("GET", f"/tasks/{_segment(task_id)}", params={"limit": 1})
        elapsed = time.monotonic() - start
        line = _progress(task, elapsed)
        finished = _done(task["counts"]) == sum(task["counts"].values())
        if live:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        elif line.split("  ")[:2] != last.split("  ")[:2]:  # only on a change of counts
            print(line, file=sys.stderr)
        last = line
        if finished:
            break
        if args.timeout is not None and elapsed >= args.timeout:
            if live:
                sys.stderr.write("\n")
            print(f"timed out after {args.timeout:g}s; task {task_id} is still "
                  f"{task['status']}", file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(args.interval)
    if live:
        sys.stderr.write("\n")
    task = _fetch_task(client, task_id, output=args.json or args.output)
    if args.json:
        _json(task, out)
    else:
        _print_runs(task["runs"], out, output=args.output)
    return EXIT_OK if task["status"] == TaskStatus.SUCCEEDED.value else EXIT_RUN_FAILED


def cmd_tasks_wait(args: argparse.Namespace, out: TextIO) -> int:
    return _wait(_client(args), args.id, args, out)


#: the kinds after which a watched task may have no active run left
_ENDINGS = frozenset({"run.finished", "run.released", "runs.cancelled", "task.aborted",
                      "runs.expired"})


def _event_line(event: Mapping[str, Any]) -> str:
    """One event for a human: time, kind, task, device, what it says."""
    data: Mapping[str, Any] = event.get("data") or {}
    when = str(event.get("at", ""))[:19].replace("T", " ")
    parts = [when, f"{event.get('kind', ''):<15}", str(event.get("task_id", ""))]
    if event.get("node_id"):
        parts.append(str(event["node_id"]))
    said: list[str] = []
    if "state" in data:
        said.append(str(data["state"]))
    if data.get("exit_code") is not None:
        said.append(f"exit {data['exit_code']}")
    if "attempts" in data and event.get("kind") != "run.released":
        said.append(f"attempt {data['attempts']}")
    if data.get("recovered"):
        said.append("recovered")
    if "name" in data:
        said.append(f"name {data['name']!r}")
    if "runs" in data:
        said.append(f"{data['runs']} run(s)")
    if "count" in data:
        nodes = list(data.get("nodes") or [])
        shown = ", ".join(str(n) for n in nodes[:3])
        more = f" +{len(nodes) - 3} more" if len(nodes) > 3 else ""
        said.append(f"{data['count']} run(s)" + (f": {shown}{more}" if nodes else ""))
    if data.get("states"):
        said.append("states " + ",".join(str(s) for s in data["states"]))
    if data.get("reason"):
        said.append(f"reason: {data['reason']}")
    if data.get("error"):
        said.append(f"error: {data['error']}")
    line = "  ".join(parts) + ("  " + ", ".join(said) if said else "")
    return str(terminal_safe(line.replace("\n", " ")))


def _task_active(client: ApiClient, task_id: str) -> tuple[bool, str]:
    """Whether the task still has runs pending or dispatched, and its status."""
    task = client.call("GET", f"/tasks/{_segment(task_id)}", params={"limit": 1})
    counts: Mapping[str, int] = task["counts"]
    active = counts.get("pending", 0) + counts.get("dispatched", 0)
    return active > 0, str(task["status"])


def _watch(client: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    task_id: str | None = args.id
    last: int | None = args.after
    params = {"task": task_id}
    connected_once = False
    backoff = 0.5
    while True:
        headers = {} if last is None else {"Last-Event-ID": str(last)}
        try:
            # Has the task ended already? A stream from now on (the first one, without
            # --after): ask as soon as it is open (its start is fixed: what ends the
            # task later comes in it). A stream that replays (a reconnection, --after):
            # once it has caught up (its first keep-alive: the replayed events, the
            # end among them, are printed first).
            check = "never" if task_id is None else (
                "open" if not connected_once and args.after is None else "caught_up")
            for raw in client.stream("/events", params=params, headers=headers):
                connected_once = True
                backoff = 0.5
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if check == "open" or (check == "caught_up" and line.startswith(": keepalive")):
                    check = "never"
                    assert task_id is not None
                    active, status = _task_active(client, task_id)
                    if not active:
                        print(f"task {terminal_safe(task_id)} has no active run left: "
                              f"{status}", file=sys.stderr)
                        return (EXIT_OK if status == TaskStatus.SUCCEEDED.value
                                else EXIT_RUN_FAILED)
                if line.startswith("id: "):
                    last = int(line[4:])  # an id line alone too: filtered events moved it
                    continue
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if args.json:
                    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
                    print(re.sub("[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text),
                          file=out, flush=True)
                else:
                    print(_event_line(event), file=out, flush=True)
                if task_id is None:
                    continue
                if event.get("kind") == "task.deleted":
                    print(f"task {terminal_safe(task_id)} was deleted", file=sys.stderr)
                    return EXIT_RUN_FAILED
                if event.get("kind") in _ENDINGS:
                    active, status = _task_active(client, task_id)
                    if not active:
                        print(f"task {terminal_safe(task_id)} has no active run left: "
                              f"{status}", file=sys.stderr)
                        return (EXIT_OK if status == TaskStatus.SUCCEEDED.value
                                else EXIT_RUN_FAILED)
        except (Unreachable, TimeoutError, OSError, ValueError) as exc:
            if not connected_once:
                raise Unreachable(str(exc)) from None
            print(f"ghostrunner: the event stream broke ({terminal_safe(str(exc)) or 'closed'});"
                  f" reconnecting after event {last}", file=sys.stderr)
        else:
            if not connected_once:
                raise Unreachable("the server closed the event stream at once")
            print(f"ghostrunner: the server closed the event stream; reconnecting after "
                  f"event {last}", file=sys.stderr)
        time.sleep(backoff)
        backoff = min(backoff * 2, 10.0)


def cmd_tasks_watch(args: argparse.Namespace, out: TextIO) -> int:
    """Follow the event log (``GET /events``), one line per event; see the help."""
    try:
        return _watch(_client(args), args, out)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_tokens_create(args: argparse.Namespace, out: TextIO) -> int:
    token = _client(args).call(
        "POST", "/token/create", body={"details": {"name": args.name, "scope": args.scope}}
    )
    if args.json:
        _json(token, out)
    else:
        print(token["token"], file=out)
        print(f"token {token['name']!r} (scope {token['scope']}) created; the secret above "
              f"is shown only this once", file=sys.stderr)
    return EXIT_OK


def cmd_tokens_list(args: argparse.Namespace, out: TextIO) -> int:
    tokens = _client(args).call("GET", "/token/list")["tokens"]
    if args.json:
        _json(tokens, out)
        return EXIT_OK
    rows = [["NAME", "SCOPE", "CREATED", "LAST USED", ""]]
    for t in tokens:
        rows.append([t["name"], t["scope"], t["created_at"], t["last_used"] or "never",
                     "builtin" if t["builtin"] else ""])
    _table(rows, out)
    return EXIT_OK


def cmd_tokens_delete(args: argparse.Namespace, out: TextIO) -> int:
    _client(args).call("DELETE", "/token/delete", body={"details": {"name": args.name}})
    if not args.json:
        print(f"token {args.name!r} deleted", file=out)
    else:
        _json({"name": args.name, "deleted": True}, out)
    return EXIT_OK


def cmd_devices(args: argparse.Namespace, out: TextIO) -> int:
    data = _client(args).call("GET", "/devices")
    if args.json:
        _json(data, out)
        return EXIT_OK
    rows = [["NAME", "NODEID", "STATE", "OS"]]
    for key, state in (("online_devices", "online"), ("offline_devices", "offline")):
        if (args.online and state != "online") or (args.offline and state != "offline"):
            continue
        for dev in data[key]:
            rows.append([dev["name"], dev["nodeid"], state, dev["os"] or ""])
    _table(rows, out)
    if data["executor_connected"] is False:
        print("note: not connected to MeshCentral right now; every device shows offline",
              file=sys.stderr)
    return EXIT_OK


def cmd_runners(args: argparse.Namespace, out: TextIO) -> int:
    data = _client(args, need_token=False).call("GET", "/")
    this, runners = data["runner"], data["runners"]
    if args.json:
        _json({"runner": this, "runners": runners}, out)
    else:
        rows = [["", "ID", "NAME", "STATE", "HEARTBEAT", "RUNS", "VERSION", "STARTED"]]
        for r in runners or []:
            state = r["state"]
            if r["adopted_by"]:
                state += f" (runs taken by {r['adopted_by']})"
            rows.append(["*" if r["id"] == this["id"] else "", r["id"], r["name"], state,
                         f"{r['heartbeat_age']:.1f}s ago", str(r["runs"]), r["version"],
                         r["started_at"]])
        _table(rows, out)
        if runners is None:
            print("note: the server could not read the runners from its database (see its "
                  "log)", file=sys.stderr)
        elif not this["shared"]:
            print("note: this server's database (SQLite) has one runner: this one",
                  file=sys.stderr)
        if this["fenced"]:
            print(f"note: runner {this['id']} ({this['name']}) could not renew its lease: "
                  f"it sends no command until it can", file=sys.stderr)
    return EXIT_API if runners is None or this["fenced"] else EXIT_OK


# --------------------------------------------------------------------------- parser


def _client_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server")
    group.add_argument("--url", help=f"the server (env GHOSTRUNNER_URL; default {DEFAULT_URL})")
    group.add_argument("--token", help="an API token (env GHOSTRUNNER_TOKEN, which keeps it "
                                       "out of the process list)")
    group.add_argument("--token-file", help="read the API token from this file")
    group.add_argument("--cacert", help="CA certificate to trust for https (env "
                                        "GHOSTRUNNER_CACERT)")
    group.add_argument("--insecure", action="store_true",
                       help="do not verify the server's https certificate")
    group.add_argument("--json", action="store_true", help="print the raw JSON data")
    return parent


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


Handler = Callable[[argparse.Namespace, TextIO], int]


def build_parser() -> argparse.ArgumentParser:
    """The ``ghostrunner`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ghostrunner",
        description="Queue shell commands for MeshCentral devices that are offline; they "
                    "run when each device comes online.",
        epilog="Run 'ghostrunner serve --help' to set up the server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_options()

    s = sub.add_parser("serve", help="run the server", description=SERVE_HELP,
                       epilog=_serve_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", "-c", help="TOML configuration file (env GHOSTRUNNER_CONFIG)")
    s.add_argument("--host", help="listen address (server.host; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (server.port; default 8080)")
    s.add_argument("--database", help="SQLite database file (or sqlite:///path), or a "
                                      "postgresql://user:password@host/db URL (database; "
                                      "default ghostrunner.db)")
    s.add_argument("--executor", choices=["meshcentral", "fake"],
                   help="meshcentral (default) or fake (try the API without MeshCentral)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(handler=None)

    tasks = sub.add_parser("tasks", help="queue, list, show, pause, retry, abort, cancel, "
                                         "wait for and watch tasks")
    tsub = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = tsub.add_parser(
        "add", parents=[client], help="queue a command for devices",
        description="Queue a command for devices: those named with --node, and those a "
                    "selector matches (--group, --tag, --os, --device-name, --all: a "
                    "device must match every one given), online or not; each runs it when "
                    "it comes online.",
        epilog="example: upgrade every Raspberry Pi in group pis, also those enrolled "
               "later,\nten at a time, stopping if more than 20% of 5 or more fail:\n"
               "  ghostrunner tasks add 'apt-get -y upgrade' --group pis --tag arm "
               "--continuous \\\n"
               "      --max-concurrent 10 --abort-failed-pct 20 --abort-min-finished 5\n"
               "see docs/fleet-rollouts.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", help="the shell command (quote it)")
    p.add_argument("--node", "-n", action="append",
                   help="a target node id (repeat for more devices); optional with a "
                        "selector")
    p.add_argument("--name", help="a label (default: the command's start)")
    p.add_argument("--shell", choices=[s.value for s in Shell])
    p.add_argument("--timeout", type=_positive, help="seconds the command may run")
    p.add_argument("--not-before", help="ISO-8601 time (with zone) before which it won't run")
    p.add_argument("--expires-at", help="ISO-8601 time after which it won't start")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--delivery", choices=[d.value for d in Delivery])
    p.add_argument("--run-as-user", action="store_true",
                   help="run in the logged-in user's session")
    sel = p.add_argument_group("select devices (a device must match every one given)")
    sel.add_argument("--group", help="a device group, by name or id (mesh//...)")
    sel.add_argument("--tag", action="append",
                     help="a device tag, case-insensitive (repeat: the device needs every "
                          "one, or any one with --tags-mode any)")
    sel.add_argument("--tags-mode", choices=["all", "any"],
                     help="all (default): every --tag; any: at least one")
    sel.add_argument("--os", help="a case-insensitive substring of the device's OS")
    sel.add_argument("--device-name", metavar="GLOB",
                     help="a glob on the device name, e.g. 'rpi-*' (--name is the task's "
                          "label)")
    sel.add_argument("--all", dest="all_devices", action="store_true",
                     help="every device the server manages")
    sel.add_argument("--continuous", action="store_true",
                     help="also run on devices that match later (enrolled or retagged), "
                          "until --expires-at or until the task is cancelled")
    roll = p.add_argument_group("rollout")
    roll.add_argument("--max-concurrent", type=int, metavar="N",
                      help="at most N runs of this task in flight at once")
    roll.add_argument("--per-minute", type=int, metavar="N",
                      help="at most N runs started in any 60 seconds")
    roll.add_argument("--abort-failed-pct", type=float, metavar="PCT",
                      help="abort (cancel every run not started) when more than PCT%% of "
                           "the finished runs failed or timed out...")
    roll.add_argument("--abort-min-finished", type=int, metavar="N",
                      help="...once at least N runs finished (default 1)")
    roll.add_argument("--success-exit-code", type=int, action="append", metavar="CODE",
                      help="an exit code that means success (repeat; default 0 only)")
    p.add_argument("--wait", action="store_true", help="then wait for it, showing progress")
    _wait_options(p)
    p.set_defaults(handler=cmd_tasks_add, check=_check_tasks_add)

    p = tsub.add_parser("list", parents=[client], help="list tasks, newest first")
    p.add_argument("--state", choices=[s.value for s in RunState],
                   help="only tasks with a run in this state")
    p.add_argument("--status", choices=[s.value for s in TaskStatus])
    p.add_argument("--node", help="only tasks targeting this node id")
    p.add_argument("--name", help="only tasks with this name")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor", help="continue after a previous page")
    p.add_argument("--all", action="store_true", help="every page")
    p.set_defaults(handler=cmd_tasks_list)

    p = tsub.add_parser("show", parents=[client], help="a task and all its runs")
    p.add_argument("id")
    p.add_argument("--no-output", action="store_true", help="leave out the commands' output")
    p.add_argument("--attempts", action="store_true",
                   help="also print every run's attempt history (retries, lost attempts)")
    p.set_defaults(handler=cmd_tasks_show)

    p = tsub.add_parser("pause", parents=[client],
                        help="hold a task: none of its runs starts until resumed",
                        description="Pause a task: none of its runs starts until 'tasks "
                                    "resume'; runs in flight finish.")
    p.add_argument("id")
    p.set_defaults(handler=cmd_tasks_pause)

    p = tsub.add_parser("resume", parents=[client], help="let a paused task go on")
    p.add_argument("id")
    p.set_defaults(handler=cmd_tasks_resume)

    retryable = [s.value for s in RunState if s.terminal and s is not RunState.SUCCEEDED]
    p = tsub.add_parser("retry", parents=[client],
                        help="send a task's failed runs again (a new attempt each)",
                        description="Put the task's runs that ended in the given states "
                                    "back to pending, each as a new attempt (see 'tasks "
                                    "show --attempts'). Retrying cancelled runs reopens an "
                                    "aborted task.")
    p.add_argument("id")
    p.add_argument("--state", action="append", choices=retryable,
                   help="retry runs in this state (repeat; default failed and timed_out)")
    p.set_defaults(handler=cmd_tasks_retry)

    p = tsub.add_parser("abort", parents=[client],
                        help="stop a task: cancel every run not started, add no device",
                        description="Abort a task as its rollout's abort rule would: every "
                                    "run not yet started is cancelled, no device is added "
                                    "any more, and the task shows aborted. Runs in flight "
                                    "finish.")
    p.add_argument("id")
    p.add_argument("--reason", help="recorded as why (default: aborted by an operator)")
    p.set_defaults(handler=cmd_tasks_abort)

    p = tsub.add_parser("cancel", parents=[client], help="cancel a task's pending runs")
    p.add_argument("id")
    p.add_argument("--node", "-n", action="append", help="only for this node id (repeat)")
    p.set_defaults(handler=cmd_tasks_cancel)

    p = tsub.add_parser("delete", parents=[client],
                        help="cancel a task's pending runs and remove it")
    p.add_argument("id")
    p.set_defaults(handler=cmd_tasks_delete)

    p = tsub.add_parser("flush", parents=[client],
                        help="cancel everything pending and remove finished tasks")
    p.add_argument("--yes", action="store_true", help="really do it")
    p.set_defaults(handler=cmd_tasks_flush)

    p = tsub.add_parser("wait", parents=[client],
                        help="wait until every run of a task has finished, showing progress")
    p.add_argument("id")
    _wait_options(p)
    p.set_defaults(handler=cmd_tasks_wait)

    p = tsub.add_parser(
        "watch", parents=[client], help="follow runs and tasks as they change (live events)",
        description="Print one line per event (task created, run claimed, finished, "
                    "released, runs cancelled, retried, expired...) as the server records "
                    "them, from GET /events. A lost connection is resumed where it was "
                    "(Last-Event-ID): no event is missed or printed twice. --json prints "
                    "each event as one line of JSON. Ctrl-C stops it (exit 0). With a task "
                    "id: only that task's events, and it exits when the task has no run "
                    "pending or in flight left: 0 if every run succeeded, 1 otherwise "
                    "(failed, cancelled, aborted, expired, or the task was deleted); 3 if "
                    "the task does not exist or the server cannot be reached.")
    p.add_argument("id", nargs="?", help="only this task's events; exit when it is done")
    p.add_argument("--after", type=int, metavar="EVENT_ID",
                   help="start after this event id (0: from the oldest kept; default: "
                        "only the events to come)")
    p.set_defaults(handler=cmd_tasks_watch)

    tokens = sub.add_parser("tokens", help="manage API tokens (needs an admin token)")
    ksub = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ksub.add_parser("create", parents=[client], help="create a token; prints its secret")
    p.add_argument("name")
    p.add_argument("--scope", choices=[s.value for s in Scope], default="write",
                   help="write (default: create/delete tasks), read (look only) or admin "
                        "(tokens too)")
    p.set_defaults(handler=cmd_tokens_create)
    p = ksub.add_parser("list", parents=[client], help="list tokens (never their secrets)")
    p.set_defaults(handler=cmd_tokens_list)
    p = ksub.add_parser("delete", parents=[client], help="revoke a token")
    p.add_argument("name")
    p.set_defaults(handler=cmd_tokens_delete)

    p = sub.add_parser("devices", parents=[client], help="devices, online and offline")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--online", action="store_true", help="only online devices")
    group.add_argument("--offline", action="store_true", help="only offline devices")
    p.set_defaults(handler=cmd_devices)

    p = sub.add_parser(
        "runners", parents=[client], help="the runners sharing the server's database",
        description="The runners (ghostrunner serve processes) sharing the server's "
                    "database, as the database sees them: each one's lease (alive, expired, "
                    "adopted: another runner took over its runs, stopped), its last "
                    "heartbeat and the runs it has in flight; * marks the server asked. "
                    "Needs no token. Exit status 0, or 3 if the server cannot read them or "
                    "could not renew its own lease (it sends nothing meanwhile).")
    p.set_defaults(handler=cmd_runners)

    add_lab_parser(sub)
    add_db_parser(sub)
    return parser


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-timeout", dest="timeout", type=_positive,
                   help="give up waiting after this many seconds (exit 124)")
    p.add_argument("--interval", type=_positive, default=1.0,
                   help="seconds between progress checks (default 1)")
    p.add_argument("--output", action="store_true", help="print each run's output at the end")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the ``ghostrunner`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = getattr(
        args, "check", None)
    if check is not None:
        check(parser, args)  # usage errors argparse cannot see: exit 2
    if args.command == "serve":
        return cmd_serve(args)
    handler: Handler = args.handler
    stream = out or sys.stdout
    try:
        return handler(args, stream)
    except ConfigError as exc:
        print(f"ghostrunner: {terminal_safe(exc.message)}", file=sys.stderr)
        return EXIT_USAGE
    except ApiFailure as exc:
        print(f"ghostrunner: error {exc.status}: {terminal_safe(exc.message)}",
              file=sys.stderr)
        return EXIT_API
    except Unreachable as exc:
        print(f"ghostrunner: {terminal_safe(str(exc))}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
