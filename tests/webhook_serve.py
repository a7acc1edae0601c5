"""``ghostrunner serve`` whose SQLite store has an event log: ``python -m
tests.webhook_serve serve --config ...``.

The core's event log (``Store.events_after``, ``Store.last_event_id``) is another
branch's work. Until it is merged, this gives ``SQLiteStore`` those two methods, reading
the events a test appends to the JSON-lines file named by ``WEBHOOK_TEST_EVENTS``
(durable: it survives a SIGKILL of the server), then runs the real command. Everything
else (configuration, the app, the webhook worker, the outbox in the SQLite database,
signals) is ``ghostrunner serve`` as shipped. Once the event log is merged, the tests
that use this module run the plain command and make events with tasks instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ghostrunner.sqlite import SQLiteStore
from tests.webhookkit import Ev, FileSource


def main() -> int:
    source = FileSource(Path(os.environ["WEBHOOK_TEST_EVENTS"]))

    async def events_after(self: SQLiteStore, after_id: int, limit: int) -> Sequence[Ev]:
        return await source.events_after(after_id, limit)

    async def last_event_id(self: SQLiteStore) -> int:
        return await source.last_event_id()

    SQLiteStore.events_after = events_after  # type: ignore[attr-defined]
    SQLiteStore.last_event_id = last_event_id  # type: ignore[attr-defined]
    from ghostrunner_http.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
