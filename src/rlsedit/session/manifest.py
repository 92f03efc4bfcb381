"""``manifest.json``: the root of trust of a state directory.

It holds the caller's metadata (opaque JSON), the current snapshot (file name, size, sha256,
and how many journal entries it covers), and the journal head (entry count and the sha256 of
the last entry). Together with the hash chain inside the journal (each entry stores the sha256
of the one before it) this covers every byte of every file the state depends on, while the
manifest stays O(1) in the length of the history.

The manifest checks itself: ``manifest_sha256`` is the sha256 of the canonical JSON of all the
other fields, so any edit of a value is caught (a whitespace-only edit changes no value and is
harmlessly accepted). This detects accidents and careless edits, not a deliberate forger who
recomputes the checksums; nor can it detect a whole manifest replaced by an older valid one.
Example (abridged)::

    {"format": "rlsedit-state", "format_version": 1,
     "journal": {"count": 3, "head_sha256": "9f2c..."},
     "manifest_sha256": "51aa...", "meta": {"method": "rlsedit", ...},
     "snapshot": {"covers_seq": 2, "file": "snapshot-00000002-0c1d2e3f4a5b.safetensors",
                  "sha256": "0c1d...", "size": 73112},
     "written_by": "rlsedit 0.1.0"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import StateCorruptError, StateError
from .jsonio import dumps_json, loads_json
from .tensorfile import sha256_hex

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "rlsedit-state"
FORMAT_VERSION = 1

SNAPSHOT_NAME_RE = re.compile(r"^snapshot-(\d{8,})-([0-9a-f]{12})\.safetensors$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SnapshotRef:
    """The manifest's record of the current snapshot file (a name inside the state dir)."""

    file: str
    sha256: str
    size: int
    covers_seq: int  # the snapshot reflects journal entries 0 .. covers_seq-1


@dataclass(frozen=True)
class Manifest:
    """Parsed, validated content of ``manifest.json``. Immutable: writers build a new one."""

    meta: dict[str, Any] = field(default_factory=dict)
    snapshot: SnapshotRef | None = None
    journal_count: int = 0  # entries 0 .. journal_count-1 are acknowledged
    journal_head_sha256: str | None = None  # sha256 of entry journal_count-1; None when empty

    def to_json_obj(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "written_by": f"rlsedit {__version__}",
            "meta": self.meta,
            "snapshot": None
            if self.snapshot is None
            else {
                "file": self.snapshot.file,
                "sha256": self.snapshot.sha256,
                "size": self.snapshot.size,
                "covers_seq": self.snapshot.covers_seq,
            },
            "journal": {"count": self.journal_count, "head_sha256": self.journal_head_sha256},
        }
        body["manifest_sha256"] = _body_sha256(body)
        return body


def _body_sha256(body: dict[str, Any]) -> str:
    return sha256_hex(dumps_json(body).encode("utf-8"))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_manifest(data: bytes, path: Path) -> Manifest:
    """Validate ``data`` (the bytes of ``path``) completely; raise naming ``path`` otherwise.

    :class:`StateCorruptError` for anything malformed or failing its checksum;
    :class:`StateError` for a format version this rlsedit does not know.
    """

    def corrupt(problem: str) -> StateCorruptError:
        return StateCorruptError(f"manifest {path} is corrupt: {problem}")

    try:
        obj = loads_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise corrupt(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise corrupt(f"not an rlsedit manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = obj.get("format_version")
    if not _is_count(version):
        raise corrupt(f"format_version is {version!r}, expected an integer")
    if version != FORMAT_VERSION:
        raise StateError(
            f"manifest {path} has format_version {version}; this rlsedit reads version "
            f"{FORMAT_VERSION} only (upgrade rlsedit if the directory was written by a newer one)"
        )
    stored_sha = obj.pop("manifest_sha256", None)
    try:
        recomputed = _body_sha256(obj)
    except StateError as exc:
        raise corrupt(str(exc)) from None
    if stored_sha != recomputed:
        raise corrupt("manifest_sha256 does not match its content (it was edited, truncated or damaged)")

    expected_keys = {"format", "format_version", "written_by", "meta", "snapshot", "journal"}
    if set(obj) != expected_keys:
        raise corrupt(f"fields {sorted(obj)}, expected {sorted(expected_keys)}")
    meta, snapshot_obj, journal = obj["meta"], obj["snapshot"], obj["journal"]
    if not isinstance(meta, dict):
        raise corrupt("meta is not an object")
    if not isinstance(journal, dict) or set(journal) != {"count", "head_sha256"}:
        raise corrupt("journal must hold exactly count and head_sha256")
    count, head = journal["count"], journal["head_sha256"]
    if not _is_count(count):
        raise corrupt(f"journal count is {count!r}")
    if count == 0 and head is not None:
        raise corrupt("an empty journal has a head checksum")
    if count > 0 and not (isinstance(head, str) and _SHA256_RE.match(head)):
        raise corrupt(f"journal head_sha256 is {head!r}")

    snapshot = None
    if snapshot_obj is not None:
        snapshot_keys = {"file", "sha256", "size", "covers_seq"}
        if not isinstance(snapshot_obj, dict) or set(snapshot_obj) != snapshot_keys:
            raise corrupt("snapshot must hold exactly file, sha256, size and covers_seq")
        name, sha, size, covers = (snapshot_obj[k] for k in ("file", "sha256", "size", "covers_seq"))
        match = SNAPSHOT_NAME_RE.match(name) if isinstance(name, str) else None
        if match is None:  # also keeps the name inside the directory (no "/" or "..")
            raise corrupt(f"snapshot file name {name!r} is not snapshot-<seq>-<sha>.safetensors")
        if not _is_count(size) or not _is_count(covers) or covers > count:
            raise corrupt(f"snapshot size {size!r} / covers_seq {covers!r} invalid ({count} journal entries)")
        if not (isinstance(sha, str) and _SHA256_RE.match(sha) and name == snapshot_file_name(covers, sha)):
            raise corrupt(f"snapshot sha256 {sha!r} / covers_seq {covers} do not match file name {name!r}")
        snapshot = SnapshotRef(file=name, sha256=sha, size=size, covers_seq=covers)
    return Manifest(meta=meta, snapshot=snapshot, journal_count=count, journal_head_sha256=head)


def snapshot_file_name(covers_seq: int, sha256: str) -> str:
    """``snapshot-<covers_seq:08d>-<first 12 hex of sha256>.safetensors``.

    Content-addressed, so a new snapshot never overwrites the file the current manifest
    points to, even for the same ``covers_seq``.
    """
    return f"snapshot-{covers_seq:08d}-{sha256[:12]}.safetensors"
