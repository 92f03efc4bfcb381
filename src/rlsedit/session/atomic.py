"""Durable, all-or-nothing file writes.

A write here either leaves the old file (or no file) in place, or the complete new one; never
a prefix. The order of operations is what makes that true on a POSIX file system:

1. write the bytes to a temporary file in the *same* directory (``.tmp-<name>-<random>``),
   so the final rename never crosses a file system;
2. ``flush`` and ``fsync`` the temporary file: its data is on disk before it gets a name;
3. ``os.replace`` it onto the final name: rename is atomic, a reader sees old or new;
4. ``fsync`` the directory: the rename itself (a directory entry) is on disk.

A crash before step 3 leaves only a temporary file, which :func:`remove_temp_files` deletes
(the store calls it on open, under the lock). A crash after step 4 leaves the new file.
Between 3 and 4 the file system may show either version after the crash, both complete.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import StateError
from .jsonio import dumps_json

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
"""Every temporary file this module creates starts with this; nothing else in a state dir does."""


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (creations, renames, removals) durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring).

    Raises :class:`~rlsedit.errors.StateError` naming the file if the system refuses the
    write (disk full, permissions, ...); the old file, if any, is then left untouched.
    """
    atomic_write_chunks(path, (data,))


def atomic_write_chunks(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview]) -> None:
    """:func:`atomic_write_bytes` of the concatenation of ``chunks``, written as they come
    (a large file never needs to exist in memory as one buffer)."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(6)}")
    try:
        # 0o644 minus umask, like an ordinary file (mkstemp would force 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(f"could not write {path}: {exc}") from exc


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as JSON (indent 2, sorted keys, UTF-8)."""
    atomic_write_bytes(path, dumps_json(obj).encode("utf-8"))


def list_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Temporary files left in ``directory`` by writes that never reached their rename."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_file())


def remove_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the leftovers :func:`list_temp_files` finds; return what was removed.

    Only safe while no other writer uses ``directory`` (the store holds its lock).
    """
    removed = list_temp_files(directory)
    for tmp in removed:
        tmp.unlink(missing_ok=True)
        logger.warning("removed %s: a temporary file left by an interrupted write", tmp)
    if removed:
        fsync_dir(directory)
    return removed
