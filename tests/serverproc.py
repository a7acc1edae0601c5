"""A real ``ghostrunner serve`` process for tests: :class:`ServerProcess`.

Shared by the HTTP tests (``tests/http``) and the fault tests against the MeshCentral lab
(``tests/integration``): ``from tests.serverproc import ServerProcess``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ghostrunner import Event
from ghostrunner.sqlite import SQLiteStore

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``python -m ghostrunner_http.cli serve`` in a subprocess on a loopback port.

    Args:
        workdir: its working directory; holds the config, the database and the log.
        config: the TOML text (host and port are added).
        env: extra environment variables.
        module: the module run with ``python -m``.
    """

    def __init__(self, workdir: Path, config: str = 'executor = "fake"\n',
                 env: dict[str, str] | None = None, scheme: str = "http",
                 module: str = "ghostrunner_http.cli") -> None:
        self.workdir = workdir
        self.module = module
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.config = workdir / "ghostrunner.toml"
        self.config.write_text(
            f'database = "{workdir / "ghostrunner.db"}"\n{config}\n'
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\n',
            encoding="utf-8",
        )
        self.log_path = workdir / "server.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GHOSTRUNNER_")},
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30.0, verify: Any = True,
              preexec_fn: Callable[[], Any] | None = None) -> ServerProcess:
        """Start it and wait until ``GET /`` answers. ``preexec_fn`` runs in the child
        before the server (e.g. to lower its file descriptor limit)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "serve", "--config",
                 str(self.config)],
                cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=preexec_fn,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            try:
                r = httpx.get(self.url + "/", timeout=1.0, verify=verify)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"server did not answer within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig``; return the exit status (it must exit within ``timeout``)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"server did not exit within {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def files_bytes(self) -> bytes:
        """Everything in the database files (main, WAL, shared memory)."""
        out = b""
        for path in sorted(self.workdir.glob("ghostrunner.db*")):
            out += path.read_bytes()
        return out

    def stored_events(self) -> list[Event]:
        """The store's event log, every event kept, read from the database once the
        server has exited (one process per SQLite file)."""
        assert self.proc is None or self.proc.poll() is not None, "the server still runs"

        async def read() -> list[Event]:
            store = SQLiteStore(self.workdir / "ghostrunner.db")
            await store.open()
            try:
                found: list[Event] = []
                while batch := await store.events_after(found[-1].id if found else 0, 1000):
                    found.extend(batch)
                return found
            finally:
                await store.close()

        return asyncio.run(read())

    def call(self, method: str, path: str, token: str | None = None, **kw: Any
             ) -> httpx.Response:
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, self.url + path, headers=headers, timeout=10.0, **kw)
