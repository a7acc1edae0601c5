"""One GhostRunner process per database file: an advisory lock (flock) beside it.

Two processes on one database would both recover and dispatch the same runs: an
``at_most_once`` command could run twice. The kernel drops the lock when the process
dies, however it dies, so a restart after a crash is never blocked.
"""

from __future__ import annotations

import errno
import os

try:
    import fcntl
except ImportError:  # Windows: no advisory lock (one process per database is on you)
    fcntl = None  # type: ignore[assignment]

from ..errors import StoreError
from ._files import FILE_MODE, on_disk, tighten


def lock_database(path: str) -> int | None:
    """Take the exclusive lock of the database ``path`` (``<path>.lock``) and return its
    file descriptor: the lock lasts until :func:`unlock`. None for in-memory databases."""
    if not on_disk(path) or fcntl is None:
        return None
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    tighten(fd, lock_path)  # one an earlier version made with the umask's mode
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise StoreError(
            f"the database {path} is in use by another GhostRunner (pid {holder}, lock "
            f"{lock_path}); run one process per database"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # releases the flock
