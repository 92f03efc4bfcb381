"""The files that make the method benchmark resumable (all under its ``out`` folder).

``settings.json`` pins the edit stream and every setting that changes a figure (a rerun with
other settings is refused); ``unedited.json`` holds the base model's row, scored once for all
the processes sharing ``out`` and written in stages (a stage, or a field newer than the row, is
added once: :func:`add_to_unedited`); ``<run>/progress.jsonl`` holds one line per finished batch,
appended and synced, with a torn last line (a crash mid-write) dropped on reading;
``<run>/run.json`` names the run the folder holds, so a report finds every run of ``out``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import StateMismatchError
from ..filelock import StateLock
from ..requests import EditRequest
from .edit_stream import edit_stream_sha256
from .methods_config import MethodBenchConfig
from .sweep import run_dir_name

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
UNEDITED = "unedited"
UNEDITED_SCORES = ("evaluation", "final")  # the unedited row's own scores: its last stage
RUN_FILE = "run.json"


def unedited_once(out: Path, score: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The unedited row, scored by one process and read by every other.

    Methods of one benchmark may run as separate processes on the same ``out`` (that is how
    a long stream uses several cores); the first to arrive scores the base model while it
    holds the lock on ``out``, the others wait for it and read ``unedited.json`` instead of
    repeating the scoring (ten minutes for 1,000 CounterFact edits on a CPU).
    """
    path = out / f"{UNEDITED}.json"
    with StateLock(out, wait=True):
        if path.is_file():
            return json.loads(path.read_text())
        unedited = score()
        write_json(path, unedited)
        return unedited


def add_to_unedited(out: Path, keys: Sequence[str], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The unedited row with ``keys``: the row is written in stages (and one written by an older
    version lacks later keys), so the first process to arrive without them runs ``compute`` under
    the lock on ``out`` and adds what it returns to ``unedited.json``; the others read it there."""
    path = out / f"{UNEDITED}.json"
    with StateLock(out, wait=True):
        unedited = json.loads(path.read_text())
        if any(key not in unedited for key in keys):
            unedited.update(compute())
            write_json(path, unedited)
        return unedited


def merge_into_unedited(out: Path, key: str, missing: Callable[[dict | None], dict]) -> dict[str, Any]:
    """The unedited row with the mapping under ``key`` completed: ``missing(current)`` returns the
    entries it lacks (a row scored when the run sampled fewer edits), computed by the first process
    to arrive, under the lock on ``out``, and merged into ``unedited.json``."""
    path = out / f"{UNEDITED}.json"
    with StateLock(out, wait=True):
        unedited = json.loads(path.read_text())
        extra = missing(unedited.get(key))
        if extra:
            unedited[key] = {**(unedited.get(key) or {}), **extra}
            write_json(path, unedited)
        return unedited


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically."""
    from ..session.atomic import atomic_write_json

    atomic_write_json(path, obj)


def write_run_name(folder: Path, name: str) -> None:
    """Record which run ``folder`` holds (``rlsedit[mu_reg=2]``): its folder name cannot be read back."""
    write_json(folder / RUN_FILE, {"name": name})


def read_run_name(folder: Path) -> str:
    """The run ``folder`` holds: the recorded name when it is this folder's (a folder written before
    names were recorded, or renamed since, is reported under its own name, never as another run)."""
    path = folder / RUN_FILE
    name = json.loads(path.read_text())["name"] if path.is_file() else None
    return name if name is not None and run_dir_name(name) == folder.name else folder.name


def read_progress(path: Path, *, redo: str = "delete the run's folder to redo it") -> list[dict[str, Any]]:
    """Lines of an appended JSONL file (a run's progress, the unedited row's parts); a torn last line
    (a crash mid-write) is dropped. ``redo``: what the error for a broken earlier line advises."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line", path)
                break
            raise StateMismatchError(f"{path} line {i + 1} is not JSON; {redo}") from None
    return out


def append_progress(path: Path, record: dict[str, Any]) -> None:
    """Append one batch's line to the progress file and sync it to disk."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def rewrite_progress(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace the progress file by ``records``, atomically."""
    from ..session.atomic import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def bench_settings(config: MethodBenchConfig, requests: Sequence[EditRequest],
                   general: Sequence[str]) -> dict[str, Any]:
    """What ``settings.json`` pins: every setting that changes a figure, and the edit stream."""
    keys = ("model", "data", "n", "batch_size", "checkpoints", "general_n", "gsm8k_limit", "ppl_tokens",
            "max_new_tokens", "fluency_n", "retention_bins", "seed", "shuffle", "mom2_tokens", "corpus", "device",
            "gen_n", "gen_max_new_tokens", "gen_chat")
    out = {k: getattr(config, k) for k in keys}
    # pinned only when set, so a benchmark begun before these settings existed still resumes
    for key, value in (("checkpoint_edits", list(config.checkpoint_edits)),
                       ("retention_first", config.retention_first),
                       ("stop_below_chance", config.stop_below_chance)):
        if value:
            out[key] = value
    out["general"] = list(general)
    out["edit_ids"] = [r.id for r in requests]
    out["edit_stream_sha256"] = edit_stream_sha256(requests)
    return out


# settings that may differ between a run and its resumption without changing any figure
RESUME_FREE = {"device"}


def check_or_write_settings(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write ``settings.json``, or refuse to resume a benchmark made with other settings; return
    the settings in force (the file's: a resumable setting such as ``device`` keeps its first value)."""
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if k not in RESUME_FREE and old.get(k) != settings.get(k))
        if diff:
            raise StateMismatchError(
                f"{out} holds a benchmark made with other settings ({', '.join(diff)}); "
                "use a new --out folder or delete the old one")
        return old
    write_json(path, settings)
    return settings
