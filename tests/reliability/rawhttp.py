"""A lean asyncio HTTP/1.1 keep-alive client for the load and flood tests.

As little client work per request as possible (the client shares the machine's two
cores with the server it measures): requests are pre-built bytes, answers are read by
``Content-Length``. The same approach as ``benchmarks/bench_http.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
from collections.abc import Mapping


class Connection:
    """One keep-alive HTTP/1.1 connection to ``127.0.0.1:port``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request; return (status, headers with lower-case names, body)."""
        self.writer.write(request)
        await self.writer.drain()
        return await self.read_answer()

    async def read_answer(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return out
            out += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):  # the server may have reset it first
            await self.writer.wait_closed()


def build(method: str, path: str, body: bytes = b"", token: str | None = None,
          headers: Mapping[str, str] | None = None) -> bytes:
    """The bytes of one request (``Content-Length`` unless ``headers`` say chunked)."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    extra = dict(headers or {})
    if "Transfer-Encoding" not in extra:
        head.append(f"Content-Length: {len(body)}")
    if body:
        head.append("Content-Type: application/json")
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    head.extend(f"{k}: {v}" for k, v in extra.items())
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0 < q < 100) of ``values`` (inclusive method)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]
