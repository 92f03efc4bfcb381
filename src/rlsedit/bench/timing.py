"""Which batches of a method benchmark timed an edit, on which device, and what they come to:
the one rule the report's s/edit, its trajectory and the cost plot share."""

from __future__ import annotations

import re
import statistics
from typing import Any, Sequence


def batch_device(record: dict[str, Any], first_device: str | None) -> str | None:
    """The device that ran a progress line's batch: its ``machine.device``; a line written before
    lines named their machine (2026-12-03) ran on ``first_device``, the device the benchmark's
    settings were first written with (``settings.json``: a resumed run may change the device, but
    no run changed it before lines recorded it)."""
    return (record.get("machine") or {}).get("device") or first_device


def _cpu_model(record: dict[str, Any]) -> str | None:
    """The CPU a progress line's batch ran on, without trademark marks ('Intel Xeon Processor'),
    or None for a line written before lines named it."""
    cpu = (record.get("machine") or {}).get("cpu")
    return re.sub(r"\s*\((R|TM)\)", "", cpu).strip() if cpu else None


def times_an_edit(record: dict[str, Any]) -> bool:
    """Whether a progress line's seconds time its batch's edits. Not so for a batch resumed from
    the journal (no timings) or one whose value targets were replayed from the target log, all
    (``targets_replayed``: it timed keys and the solve, not the edit) or some of them (ROME
    resumed mid-batch: ``targets_replayed_edits``)."""
    return (record.get("total_s") is not None and not record.get("targets_replayed")
            and not record.get("targets_replayed_edits"))


def timed_batches(records: Sequence[dict[str, Any]],
                  first_device: str | None = None) -> list[tuple[dict[str, Any], int, str | None]]:
    """``(progress line, edits in its batch, device)`` of every line that :func:`times_an_edit`,
    in batch order. When the CPU batches ran on more than one CPU model (a resumed stream moved to
    another machine), the device names the model too ('cpu: AMD EPYC'): the same code can run twice
    as long on another CPU, and one mean over both describes neither."""
    out, previous = [], 0
    for rec in sorted(records, key=lambda r: r["batch"]):
        size, previous = rec["edits"] - previous, rec["edits"]
        if times_an_edit(rec):
            out.append((rec, size, batch_device(rec, first_device)))
    models = {_cpu_model(rec) for rec, _, device in out if device == "cpu"} - {None}
    if len(models) < 2:
        return out
    return [(rec, size, f"cpu: {_cpu_model(rec)}" if device == "cpu" and _cpu_model(rec) else device)
            for rec, size, device in out]


def timing_summary(records: Sequence[dict[str, Any]], first_device: str | None = None) -> dict[str, Any]:
    """``seconds_per_edit`` over the :func:`timed_batches` and the mean ``solve_seconds_per_batch``,
    from progress records, overall and per device (``by_device``: a stream that moved between a
    CPU and a GPU has one figure per device; their overall mean describes neither)."""
    timed = timed_batches(records, first_device)

    def summary(rows: list[tuple[dict[str, Any], int, str | None]]) -> dict[str, float | None]:
        edits = sum(size for _, size, _ in rows)
        solve = [rec["solve_s"] for rec, _, _ in rows if rec.get("solve_s") is not None]
        return {"seconds_per_edit": sum(rec["total_s"] for rec, _, _ in rows) / edits if edits else None,
                "solve_seconds_per_batch": statistics.fmean(solve) if solve else None}

    devices = dict.fromkeys(device for _, _, device in timed)
    by_device = {str(d): summary([row for row in timed if row[2] == d]) for d in devices}
    return {**summary(timed), "by_device": by_device}
