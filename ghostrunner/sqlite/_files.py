"""The database's files are the user's alone: 0600 files, 0700 directories we create.

The database holds every command and every output, so it must not take the process
umask (0644 files, or 0666 and 0777 under ``umask 000``). Before SQLite opens the
database, :func:`make_private` creates the directories missing above it (0700; a
directory that exists, the user's choice, is left as it is), creates the database file
0600 or takes group and other bits off the one that exists, and does the same for the
WAL, shared-memory and journal files left beside it. SQLite gives the ``-wal`` and
``-shm`` files it creates later the database file's mode, so they are 0600 too; the lock
file (:mod:`._lock`) is created 0600 and tightened the same way.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Final

from ..errors import StoreError

log = logging.getLogger("ghostrunner.sqlite")

FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
#: The files SQLite keeps beside the database (WAL mode: -wal and -shm).
COMPANIONS: Final = ("-wal", "-shm", "-journal")


def on_disk(path: str) -> bool:
    """False for in-memory databases and URIs (which name no plain file)."""
    return path != ":memory:" and not path.startswith("file:")


def make_private(path: str) -> None:
    """Make ``path`` (a database file) and its companions private to this user, creating
    it and the directories missing above it. Raises StoreError if that fails."""
    if not on_disk(path):
        return
    try:
        make_dirs(os.path.dirname(os.path.abspath(path)))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            tighten(fd, path)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create the database {path}: {exc.strerror or exc}") from exc
    for suffix in COMPANIONS:
        try:
            fd = os.open(path + suffix, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # not there (the usual case), or not ours to open
            continue
        try:
            tighten(fd, path + suffix)
        finally:
            os.close(fd)


def make_dirs(directory: str) -> None:
    """Create ``directory`` and its missing parents, each 0700 whatever the umask. The
    directories that exist are not touched."""
    missing: list[str] = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for made in reversed(missing):
        try:
            os.mkdir(made, DIR_MODE)
        except FileExistsError:  # made meanwhile by someone else: theirs
            continue
        os.chmod(made, DIR_MODE)  # the umask may have taken owner bits off


def tighten(fd: int, name: str) -> None:
    """Take group and other bits off the open file ``fd`` (``name``, for the log)."""
    current = stat.S_IMODE(os.fstat(fd).st_mode)
    if current & 0o077:
        try:
            os.fchmod(fd, current & ~0o077)
        except OSError as exc:  # e.g. another user's file we may write to
            log.warning("cannot make %s private to this user (mode %o): %s",
                        name, current, exc.strerror or exc)
