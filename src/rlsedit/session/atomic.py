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

import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterable
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
    _write_then_rename(path.parent, path.name, chunks, lambda: path.name)


def atomic_write_named_by_hash(
    directory: str | os.PathLike[str], name_for: Callable[[str], str], chunks: Iterable[bytes | memoryview]
) -> tuple[Path, str]:
    """Atomically write ``chunks`` under the name ``name_for(sha256 hex of the bytes)``.

    The bytes are hashed as they are written, so a file whose name carries its own checksum
    costs one pass over its contents, not a hashing pass and then a writing pass.
    Returns ``(path, sha256 hex)``.
    """
    directory = Path(directory)
    digest = hashlib.sha256()

    def hashed() -> Iterable[bytes | memoryview]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    name = _write_then_rename(directory, "hashed", hashed(), lambda: name_for(digest.hexdigest()))
    return directory / name, digest.hexdigest()


def _write_then_rename(
    directory: Path, label: str, chunks: Iterable[bytes | memoryview], final_name: Callable[[], str]
) -> str:
    """Steps 1–4 of the module docstring; ``final_name()`` is asked once every byte is written."""
    tmp = directory / f"{TEMP_PREFIX}{label}-{secrets.token_hex(6)}"
    path = None
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
        path = directory / final_name()
        os.replace(tmp, path)
        fsync_dir(directory)
        return path.name
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(f"could not write {path or directory / label}: {exc}") from exc


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
