"""StateStore: a crash-safe directory of JSON metadata, one snapshot and an append-only journal.

It knows nothing about models or editors. Layout::

    <dir>/manifest.json                          root of trust (see .manifest)
    <dir>/snapshot-<seq:08d>-<sha12>.safetensors the current snapshot (see .snapshot)
    <dir>/journal/<seq:08d>.safetensors          entries 0 .. count-1, hash-chained (see .journal)
    <dir>/.lock                                  flock of the one writer (see .lock)

Durability order (every file write is temp + fsync + rename + fsync dir, see .atomic):

``append(kind, meta, tensors)``
    1. write ``journal/<seq>.safetensors`` (it stores the sha256 of entry seq-1);
    2. write ``manifest.json`` with journal count = seq+1 and head = sha256(entry seq);
    3. return ``seq``. The entry is acknowledged exactly when ``append`` returns.
    A crash before 2 leaves an entry file beyond the manifest's head: never acknowledged, it
    is removed (and logged) by the next ``open``. A crash after 2 keeps the entry.
``write_snapshot(tensors, meta, covers_seq)``
    1. write the new snapshot file (a new, content-addressed name);
    2. write ``manifest.json`` pointing at it;
    3. remove the older snapshot files.
    A crash before 2 keeps the old snapshot (the orphan new file is removed on ``open``);
    after 2 the new one is current and leftovers are removed on ``open``.
``update_meta(changes)``
    one atomic manifest write.

``open`` takes the lock, then verifies everything before it changes or returns anything: the
manifest's own checksum, the snapshot's size and sha256, and every journal entry's sha256 by
walking the hash chain back from the manifest's head. A truncated, corrupted, tampered or
missing file raises :class:`~rlsedit.errors.StateCorruptError` naming it, and the directory is
left as it was. Only then does recovery delete temporary files, unacknowledged entries and
orphan snapshots. The snapshot is hashed in chunks there, never held in memory whole.

Reads check each file's sha256 again, so a file damaged while the store is open is reported,
never half-used. ``entries`` (small files) checks the bytes, then decodes them.
``read_snapshot`` reads the snapshot in one pass (see :func:`.tensorfile.read_verified`):
tensors are filled straight from the file while it is hashed, and returned only if the sha256
matches. Opening a session thus needs ~1x its state in memory, not the file's bytes plus a
decoded copy.

If writing the manifest fails (disk full, I/O error) the on-disk state is still consistent,
but this object may no longer match it: it refuses further use; reopen the directory.

``open_read_only`` is for readers (``status``, ``ask``, ``export``, ``eval``, a second process
looking at a state while an edit runs): it takes no lock, writes nothing and recovers nothing.
It reads the state as of one manifest — every file that manifest names is immutable once
written, so the reader sees exactly the acknowledged state at that moment. The one race is a
writer replacing the snapshot (and removing the old file) between the reader's manifest read
and its snapshot read: the reader then finds the manifest changed and reads again.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ..errors import StateCorruptError, StateError, StateMismatchError
from .atomic import (atomic_write_bytes, atomic_write_json, atomic_write_named_by_hash, fsync_dir, list_temp_files,
                     remove_temp_files)
from .journal import (
    JOURNAL_DIR_NAME,
    JournalEntry,
    check_kind,
    decode_entry,
    encode_entry,
    entry_file_name,
    parse_entry_file_name,
    read_entry_header,
)
from .jsonio import dumps_json, to_json_value
from ..filelock import LOCK_FILE_NAME, StateLock
from .manifest import (
    MANIFEST_NAME,
    SNAPSHOT_NAME_RE,
    Manifest,
    SnapshotRef,
    parse_manifest,
    snapshot_file_name,
)
from .snapshot import SNAPSHOT_WHAT, check_snapshot, encode_snapshot
from .tensorfile import (
    check_digest,
    check_sha256,
    check_size,
    file_sha256,
    read_file_bytes,
    read_verified,
    sha256_hex,
)

logger = logging.getLogger(__name__)

__all__ = ["JournalEntry", "StateStore", "is_state_dir"]


def is_state_dir(directory: str | os.PathLike[str]) -> bool:
    """True if ``directory`` holds a ``manifest.json`` (a quick test; ``open`` verifies)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


class StateStore:
    """An open, locked state directory. Build one with :meth:`create` or :meth:`open`.

    Use as a context manager (or call :meth:`close`) to release the lock. While it is open no
    other process (and no other ``StateStore`` in this one) can open the directory.

    Journal numbering: entries are ``0 .. journal_count-1``. A snapshot with ``covers_seq = n``
    is the caller's state after entries ``0 .. n-1``; replay continues at ``entries(n)``.
    """

    def __init__(
        self, directory: Path, lock: "StateLock | _NoLock", manifest: Manifest, entry_sha256s: list[str]
    ) -> None:
        # private: use create() / open(), which verify and lock
        self._directory = directory
        self._lock = lock
        self.read_only = isinstance(lock, _NoLock)
        self._manifest = manifest
        self._entry_sha256s = entry_sha256s  # sha256 of entry i, from the verified chain; O(1) per append
        self._broken: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, directory: str | os.PathLike[str], meta: Mapping[str, Any]) -> StateStore:
        """Make a new state directory (created if needed, else it must be empty) holding ``meta``.

        Raises :class:`StateError` if ``directory`` is a file or a non-empty directory (an
        existing state directory included: use :meth:`open`), or if ``meta`` is not JSON.
        Leftovers of an earlier ``create`` that crashed (lock file, empty journal dir,
        temporary files) do not count as content.
        """
        directory = Path(directory)
        if not isinstance(meta, Mapping):
            raise StateError(f"state meta must be a dict, got {type(meta).__name__}")
        manifest = Manifest(meta=to_json_value(dict(meta), what="state meta"))
        if directory.exists() and not directory.is_dir():
            raise StateError(f"cannot create a state directory at {directory}: it is a file")
        _refuse_content(directory)
        if not directory.exists():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fsync_dir(directory.parent)
            except OSError as exc:
                raise StateError(f"cannot create the state directory {directory}: {exc}") from exc
        lock = StateLock(directory)
        lock.acquire()
        try:
            _refuse_content(directory)  # again, under the lock: another creator may have won
            remove_temp_files(directory)
            journal_dir = directory / JOURNAL_DIR_NAME
            try:
                journal_dir.mkdir(exist_ok=True)
                fsync_dir(directory)
            except OSError as exc:
                raise StateError(f"cannot create {journal_dir}: {exc}") from exc
            remove_temp_files(journal_dir)
            # the manifest is written last: is_state_dir() is true only for a complete directory
            atomic_write_json(directory / MANIFEST_NAME, manifest.to_json_obj())
        except BaseException:
            lock.release()
            raise
        logger.info("created state directory %s", directory)
        return cls(directory, lock, manifest, [])

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> StateStore:
        """Lock and fully verify an existing state directory, then recover from any crash.

        Raises :class:`StateError` if it is not a state directory,
        :class:`~rlsedit.errors.StateLockedError` if another process holds it, and
        :class:`StateCorruptError` naming the first bad file found (nothing is changed then).
        """
        return cls._open(directory, read_snapshot=False)[0]

    @classmethod
    def open_reading_snapshot(
        cls, directory: str | os.PathLike[str]
    ) -> tuple[StateStore, tuple[dict[str, torch.Tensor], dict[str, Any], int] | None]:
        """:meth:`open`, with the snapshot's ``(tensors, meta, covers_seq)`` (None if there is
        none yet) read in the pass that verifies it: a caller that needs the state reads the
        snapshot file once, not once to check it and again to load it."""
        return cls._open(directory, read_snapshot=True)

    @classmethod
    def open_read_only(
        cls, directory: str | os.PathLike[str], *, attempts: int = 5
    ) -> tuple[StateStore, tuple[dict[str, torch.Tensor], dict[str, Any], int] | None]:
        """A verified, read-only view of the acknowledged state, with its snapshot (see the module
        docstring): no lock is taken, so it works while a writer holds the directory, and every
        writing method refuses. ``attempts`` bounds the re-reads when a writer replaces the
        snapshot meanwhile."""
        directory = Path(directory)
        if not is_state_dir(directory):
            raise StateError(f"{directory} is not a state directory (it has no {MANIFEST_NAME})")
        for attempt in range(attempts):
            manifest = _read_manifest(directory)
            try:
                entry_sha256s = _verify_journal(directory, manifest)
                snapshot = None if manifest.snapshot is None else _read_snapshot_file(directory, manifest.snapshot)
            except StateCorruptError:
                if _read_manifest(directory) == manifest or attempt == attempts - 1:
                    raise  # nothing moved under us: the damage is real
                continue  # a writer committed meanwhile: read the new state
            return cls(directory, _NoLock(), manifest, entry_sha256s), snapshot
        raise AssertionError("unreachable")  # the loop returns or raises

    @classmethod
    def _open(cls, directory, *, read_snapshot: bool):
        directory = Path(directory)
        if not directory.is_dir():
            raise StateError(f"no state directory at {directory}")
        if not is_state_dir(directory):
            if (directory / JOURNAL_DIR_NAME).is_dir() or any(directory.glob("snapshot-*.safetensors")):
                raise StateCorruptError(
                    f"manifest {directory / MANIFEST_NAME} is missing, but {directory} holds state files"
                )
            raise StateError(f"{directory} is not a state directory (it has no {MANIFEST_NAME})")
        lock = StateLock(directory)
        lock.acquire()
        try:
            manifest = _read_manifest(directory)
            entry_sha256s = _verify_journal(directory, manifest)
            snapshot = None
            if read_snapshot and manifest.snapshot is not None:
                snapshot = _read_snapshot_file(directory, manifest.snapshot)
            else:
                _verify_snapshot_file(directory, manifest)
            _recover(directory, manifest)
        except BaseException:
            lock.release()
            raise
        logger.debug(
            "opened state directory %s: %d journal entries, snapshot %s",
            directory,
            manifest.journal_count,
            manifest.snapshot.file if manifest.snapshot else None,
        )
        return cls(directory, lock, manifest, entry_sha256s), snapshot

    # ------------------------------------------------------------------ properties
    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the caller's metadata as stored (JSON round trip)."""
        return copy.deepcopy(self._manifest.meta)

    @property
    def journal_count(self) -> int:
        """Number of acknowledged entries; the next ``append`` returns this seq."""
        return self._manifest.journal_count

    @property
    def snapshot_covers_seq(self) -> int | None:
        """``covers_seq`` of the current snapshot, or None if none was written."""
        return None if self._manifest.snapshot is None else self._manifest.snapshot.covers_seq

    @property
    def closed(self) -> bool:
        return not self._lock.held

    # ------------------------------------------------------------------ metadata
    def update_meta(self, changes: Mapping[str, Any]) -> None:
        """Set the top-level keys of ``changes`` in the stored meta (like ``dict.update``)."""
        self._check_writable()
        if not isinstance(changes, Mapping):
            raise StateError(f"meta changes must be a dict, got {type(changes).__name__}")
        meta = {**self._manifest.meta, **to_json_value(dict(changes), what="state meta")}
        self._commit_manifest(replace(self._manifest, meta=meta))

    def check_compatible(self, expected: Mapping[str, Any]) -> None:
        """Raise :class:`StateMismatchError` unless ``meta[key] == value`` for every item.

        Values are compared as stored (their JSON form: a tuple equals a list, 1 != 1.0 != true).
        """
        if not isinstance(expected, Mapping):
            raise StateError(f"expected values must be a dict, got {type(expected).__name__}")
        stored = self._manifest.meta
        for key in sorted(expected):
            want = to_json_value(expected[key], what=f"expected value of {key!r}")
            if key not in stored:
                raise StateMismatchError(
                    f"state directory {self._directory} has no {key!r} in its metadata; expected "
                    f"{key}={dumps_json(want, compact=True)}"
                )
            if dumps_json(stored[key], compact=True) != dumps_json(want, compact=True):
                raise StateMismatchError(
                    f"state directory {self._directory} does not match: {key} expected "
                    f"{dumps_json(want, compact=True)}, found {dumps_json(stored[key], compact=True)}; "
                    f"use the same settings or a new state directory"
                )

    # ------------------------------------------------------------------ snapshot
    def write_snapshot(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], covers_seq: int
    ) -> None:
        """Make ``tensors`` + ``meta`` the current snapshot, covering entries ``0 .. covers_seq-1``.

        ``0 <= covers_seq <= journal_count``. Older snapshot files are removed afterwards.
        """
        self._check_writable()
        count = self._manifest.journal_count
        if not isinstance(covers_seq, int) or isinstance(covers_seq, bool) or not 0 <= covers_seq <= count:
            raise StateError(
                f"covers_seq must be an integer in [0, {count}] (the journal length), got {covers_seq!r}"
            )
        encoded = encode_snapshot(tensors, meta, covers_seq)
        # the name carries the hash: hashed while written, one pass over the state
        path, sha = atomic_write_named_by_hash(self._directory, lambda digest: snapshot_file_name(covers_seq, digest),
                                               encoded.chunks())
        name = path.name
        ref = SnapshotRef(file=name, sha256=sha, size=encoded.size, covers_seq=covers_seq)
        self._commit_manifest(replace(self._manifest, snapshot=ref))
        try:
            _remove_orphan_snapshots(self._directory, keep=name, level=logging.DEBUG)
        except OSError as exc:  # harmless: the manifest no longer names them; open() retries
            logger.warning("could not remove an old snapshot in %s: %s", self._directory, exc)

    def read_snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        """``(tensors, meta, covers_seq)`` of the current snapshot, checksum verified first."""
        self._check_usable()
        ref = self._manifest.snapshot
        if ref is None:
            raise StateError(f"state directory {self._directory} has no snapshot yet")
        return _read_snapshot_file(self._directory, ref)

    # ------------------------------------------------------------------ journal
    def append(self, kind: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
        """Durably add one journal entry; return its seq. Acknowledged when this returns.

        Cost is independent of the journal's length: one new file and one manifest write.
        """
        self._check_writable()
        seq = self._manifest.journal_count
        prev = self._manifest.journal_head_sha256 or ""
        data = encode_entry(seq, check_kind(kind), meta, tensors, prev)
        sha = sha256_hex(data)
        atomic_write_bytes(self._directory / JOURNAL_DIR_NAME / entry_file_name(seq), data)
        self._commit_manifest(replace(self._manifest, journal_count=seq + 1, journal_head_sha256=sha))
        self._entry_sha256s.append(sha)
        return seq

    def entries(self, start_seq: int = 0) -> Iterator[JournalEntry]:
        """Entries ``start_seq .. journal_count-1`` (count taken now), each checksum verified."""
        self._check_usable()
        count = self._manifest.journal_count
        if not isinstance(start_seq, int) or isinstance(start_seq, bool) or not 0 <= start_seq <= count:
            raise StateError(f"start_seq must be an integer in [0, {count}], got {start_seq!r}")
        return self._iter_entries(start_seq, count)

    def read_entry(self, seq: int) -> JournalEntry:
        """One entry by its seq (checksum verified); O(1) whatever the journal's length."""
        self._check_usable()
        count = self._manifest.journal_count
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < count:
            raise StateError(f"journal entry {seq!r} does not exist (the journal has {count} entries)")
        return next(self._iter_entries(seq, seq + 1))

    def _iter_entries(self, start_seq: int, stop_seq: int) -> Iterator[JournalEntry]:
        for seq in range(start_seq, stop_seq):
            self._check_usable()
            path = self._directory / JOURNAL_DIR_NAME / entry_file_name(seq)
            data = read_file_bytes(path, what="journal entry")
            check_sha256(data, self._entry_sha256s[seq], path, what="journal entry")
            entry, _ = decode_entry(data, path)
            if entry.seq != seq:
                raise StateCorruptError(f"journal entry {path} says it is entry {entry.seq}")
            yield entry

    def verify(self) -> None:
        """Re-run the full check that ``open`` does (manifest, snapshot, whole hash chain)."""
        self._check_usable()
        manifest = _read_manifest(self._directory)
        if manifest != self._manifest:
            path = self._directory / MANIFEST_NAME
            raise StateCorruptError(f"manifest {path} was changed by something other than this store")
        _verify_journal(self._directory, manifest)
        _verify_snapshot_file(self._directory, manifest)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the lock. Idempotent; the object is unusable afterwards."""
        self._lock.release()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.journal_count} entries"
        return f"StateStore({str(self._directory)!r}, {state})"

    # ------------------------------------------------------------------ internals
    def _check_usable(self) -> None:
        if self.closed:
            raise StateError(f"the StateStore of {self._directory} is closed; open it again")
        if self._broken is not None:
            raise StateError(
                f"the StateStore of {self._directory} stopped after a failed write ({self._broken}); "
                f"close it and open the directory again to recover"
            )

    def _check_writable(self) -> None:
        self._check_usable()
        if self.read_only:
            raise StateError(f"the state {self._directory} was opened read-only; open it for writing to change it")

    def _commit_manifest(self, manifest: Manifest) -> None:
        try:
            atomic_write_json(self._directory / MANIFEST_NAME, manifest.to_json_obj())
        except BaseException as exc:
            # on disk it is the old or the new manifest, both consistent; we cannot tell which
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        self._manifest = manifest


class _NoLock:
    """What a read-only store holds in place of the writer's lock: nothing, released on close."""

    held = True

    def release(self) -> None:
        self.held = False


# ---------------------------------------------------------------------- verification & recovery
def _refuse_content(directory: Path) -> None:
    if not directory.is_dir():
        return
    if is_state_dir(directory):
        raise StateError(f"{directory} is already a state directory; open it instead of creating it")
    # what an interrupted create() leaves: the lock file, temp files, a journal dir without entries
    ignorable = {LOCK_FILE_NAME, *(p.name for p in list_temp_files(directory))}
    journal_dir = directory / JOURNAL_DIR_NAME
    if journal_dir.is_dir() and set(journal_dir.iterdir()) <= set(list_temp_files(journal_dir)):
        ignorable.add(JOURNAL_DIR_NAME)
    content = sorted(p.name for p in directory.iterdir() if p.name not in ignorable)
    if content:
        shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
        raise StateError(
            f"cannot create a state directory in {directory}: it is not empty ({shown}); "
            f"choose a new or empty directory"
        )


def _read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    return parse_manifest(read_file_bytes(path, what="manifest"), path)


def _verify_journal(directory: Path, manifest: Manifest) -> list[str]:
    """Walk the hash chain from the manifest's head to entry 0; return each entry's sha256."""
    journal_dir = directory / JOURNAL_DIR_NAME
    if not journal_dir.is_dir():
        raise StateCorruptError(f"journal directory {journal_dir} is missing")
    sha256s = [""] * manifest.journal_count
    expected = manifest.journal_head_sha256
    for seq in reversed(range(manifest.journal_count)):
        assert expected is not None  # parse_manifest: count > 0 has a head; entries > 0 a prev
        path = journal_dir / entry_file_name(seq)
        data = read_file_bytes(path, what="journal entry")
        check_sha256(data, expected, path, what="journal entry")
        header = read_entry_header(data, path)
        if header.seq != seq:
            raise StateCorruptError(f"journal entry {path} says it is entry {header.seq}")
        if (seq == 0) != (header.prev_sha256 == ""):
            raise StateCorruptError(
                f"journal entry {path} has a broken chain link (prev_sha256 {header.prev_sha256!r})"
            )
        sha256s[seq] = expected
        expected = header.prev_sha256
    return sha256s


def _read_snapshot_file(directory: Path, ref: SnapshotRef) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    path = directory / ref.file
    # one pass, no file-sized buffer: the state is held once (~16 GB on a Llama-3-8B), not twice
    tensors, metadata = read_verified(path, sha256=ref.sha256, size=ref.size, what=SNAPSHOT_WHAT)
    tensors, meta, covers_seq = check_snapshot(tensors, metadata, path)
    if covers_seq != ref.covers_seq:
        raise StateCorruptError(f"snapshot {path} covers {covers_seq} entries but the manifest says {ref.covers_seq}")
    return tensors, meta, covers_seq


def _verify_snapshot_file(directory: Path, manifest: Manifest) -> None:
    ref = manifest.snapshot
    if ref is None:
        return
    path = directory / ref.file
    found, size = file_sha256(path, what=SNAPSHOT_WHAT)  # in chunks: the snapshot can be the size of a model
    check_size(size, ref.size, path, what=SNAPSHOT_WHAT)
    check_digest(found, ref.sha256, path, what=SNAPSHOT_WHAT)


def _recover(directory: Path, manifest: Manifest) -> None:
    """Delete what a crash can leave behind; only called after full verification."""
    try:
        _remove_crash_leftovers(directory, manifest)
    except OSError as exc:
        raise StateError(f"cannot clean up {directory} after an interrupted write: {exc}") from exc


def _remove_crash_leftovers(directory: Path, manifest: Manifest) -> None:
    journal_dir = directory / JOURNAL_DIR_NAME
    remove_temp_files(directory)
    remove_temp_files(journal_dir)
    removed_entry = False
    for path in sorted(journal_dir.iterdir()):
        seq = parse_entry_file_name(path.name)
        if seq is None:
            logger.warning("ignoring unexpected file %s in the journal", path)
        elif seq >= manifest.journal_count:
            # written before a crash, but the manifest never took it: append() had not returned
            path.unlink()
            removed_entry = True
            logger.warning("removed unacknowledged journal entry %s (its append was interrupted)", path)
    if removed_entry:
        fsync_dir(journal_dir)
    keep = manifest.snapshot.file if manifest.snapshot else None
    _remove_orphan_snapshots(directory, keep=keep, level=logging.WARNING)


def _remove_orphan_snapshots(directory: Path, *, keep: str | None, level: int) -> None:
    removed = False
    for path in sorted(directory.iterdir()):
        if SNAPSHOT_NAME_RE.match(path.name) and path.name != keep:
            path.unlink()
            removed = True
            logger.log(level, "removed snapshot %s, no longer current", path)
    if removed:
        fsync_dir(directory)
