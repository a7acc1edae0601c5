"""The SQLite store's files on disk: who may read them (issue #12).

The database holds every command and its output; the store creates its files for the
user alone (0600) whatever the umask, the directories it creates too (0700), and
tightens files that exist; a directory the user chose is left as it is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ghostrunner import Task
from ghostrunner.sqlite import SQLiteStore

NOW = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def umask_000() -> Iterator[None]:
    """The most permissive umask: what the store creates must not depend on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(paths: list[Path]) -> dict[str, str]:
    return {p.name: oct(mode(p)) for p in paths}


async def _use(path: Path) -> SQLiteStore:
    """An open store on ``path`` that has written (so the WAL and -shm exist)."""
    store = SQLiteStore(path)
    await store.open()
    await store.add_task(Task(name="t", command="secret-command", targets=["n1"],
                              created_at=NOW), NOW)
    return store


async def test_new_files_are_private_under_umask_000(tmp_path: Path, umask_000: None) -> None:
    os.chmod(tmp_path, 0o755)  # the user's directory, readable by all on purpose
    path = tmp_path / "ghostrunner.db"
    store = await _use(path)
    try:
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")]
        assert all(f.exists() for f in files), sorted(os.listdir(tmp_path))
        assert modes(files) == {f.name: oct(0o600) for f in files}
        assert mode(tmp_path) == 0o755  # not the store's to change
    finally:
        await store.close()
    assert mode(path) == 0o600


async def test_directories_the_store_creates_are_private(
    tmp_path: Path, umask_000: None
) -> None:
    chosen = tmp_path / "chosen"  # the user's directory, readable by all on purpose
    chosen.mkdir(mode=0o755)
    path = chosen / "made" / "deeper" / "ghostrunner.db"
    store = await _use(path)
    try:
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")]
        assert modes(files) == {f.name: oct(0o600) for f in files}
        created = [chosen / "made", chosen / "made" / "deeper"]
        assert modes(created) == {d.name: oct(0o700) for d in created}
        assert mode(chosen) == 0o755  # not the store's to change
    finally:
        await store.close()
    assert mode(path) == 0o600  # after the close too (the WAL is gone by then)


async def test_existing_files_are_tightened(tmp_path: Path, umask_000: None) -> None:
    path = tmp_path / "ghostrunner.db"
    store = await _use(path)
    await store.close()
    for name in ("ghostrunner.db", "ghostrunner.db.lock"):
        os.chmod(tmp_path / name, 0o644)  # e.g. made by an earlier version
    os.chmod(tmp_path, 0o755)
    store = await _use(path)
    try:
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")]
        assert modes(files) == {f.name: oct(0o600) for f in files}
        assert mode(tmp_path) == 0o755  # the user's directory
    finally:
        await store.close()
