"""File helpers every layer shares: the sha256 of a file, and a write readers never see half of.

A state directory needs more than :func:`atomic_replace` (fsync of the file and of its
directory, so the write survives a power loss): that is :mod:`rlsedit.session.atomic`. This
one is for caches and saved editors, where a lost write is redone, but a half-written file
must never be read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

_CHUNK_BYTES = 1 << 22  # 4 MiB: a model-sized file is never held in memory whole


def file_sha256(path: str | os.PathLike[str]) -> tuple[str, int]:
    """``(sha256 hex digest, size in bytes)`` of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    buffer = memoryview(bytearray(_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as fh:
        while count := fh.readinto(buffer):
            digest.update(buffer[:count])
            size += count
    return digest.hexdigest(), size


def atomic_replace(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``:
    a reader sees the old file or the whole new one. On any error the temporary file is gone."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
