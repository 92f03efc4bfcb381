"""One writer per state directory: an advisory ``flock`` on ``<dir>/.lock``.

The lock belongs to an open file description, so the kernel drops it when the holder exits
for any reason (``kill -9`` included): a stale lock cannot outlive its process. The holder
writes its pid into the file so that a refused process can say who holds it. The file itself
is never deleted (deleting it would let two processes lock two different inodes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from .errors import StateError, StateLockedError

LOCK_FILE_NAME = ".lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's "someone else holds it"

log = logging.getLogger(__name__)


class StateLock:
    """Exclusive lock on a directory; a context manager.

    ``with StateLock(directory): ...`` holds the lock for the block. A second holder, in
    another process or in this one, is refused at once with
    :class:`~rlsedit.errors.StateLockedError` naming the directory and the holder's pid —
    or, with ``wait=True``, blocks until the holder lets go (for work that one process does
    and the others then read, such as the benchmark's unedited scores).
    """

    def __init__(self, directory: str | os.PathLike[str], *, wait: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE_NAME
        self.wait = wait
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            raise StateError(f"the lock on {self.directory} is already held by this StateLock")
        if not self.directory.is_dir():
            raise StateError(f"cannot lock {self.directory}: not a directory")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {self.path}: {exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if not (self.wait and exc.errno in _BUSY):
                    raise
                log.info("%s is locked by %s; waiting for it", self.directory, _who(_read_pid(fd)))
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in _BUSY:
                raise StateLockedError(
                    f"state directory {self.directory} is locked by {_who(holder)}; wait for it to "
                    f"finish or stop it (lock file {self.path})"
                ) from None
            raise StateError(f"cannot lock {self.path}: {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid is only for messages; the flock is what excludes
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # closing the descriptor drops the flock
            os.close(fd)

    def __del__(self) -> None:
        # an unreachable lock can never be released otherwise (its process would keep it)
        self.release()

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"StateLock({str(self.directory)!r}, wait={self.wait}, held={self.held})"


def _who(pid: int | None) -> str:
    return f"process {pid}" if pid is not None else "another process (pid unknown)"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
