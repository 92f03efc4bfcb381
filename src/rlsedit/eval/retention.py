"""Retention over a lifelong stream: efficacy of each edit after the whole stream, by the
position at which it was applied (the forgetting curve).

After a stream of ``N`` edits applied in order, edit ``i`` (0 = first) is scored on its own
rewrite prompt exactly as CounterFact efficacy (:mod:`rlsedit.eval.counterfact`):
``success_i = [NLL(o*_i | x_i) < NLL(o_i | x_i)]`` (``None`` without an old object) and the
teacher-forced token accuracy ``acc_i``. Binning the positions into contiguous groups and
averaging gives the curve: early bins are the oldest edits, so a drop there is forgetting.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from ..requests import EditRequest
from .counterfact import score_requests
from .datafiles import EvalDataError, check_count


def bin_by_position(values: Sequence[float | None], n_bins: int) -> list[dict[str, Any]]:
    """Split positions ``0..N-1`` into ``min(n_bins, N)`` contiguous bins whose sizes differ
    by at most one (the first bins take the extra items) and average each.

    Each bin: ``{"first", "last", "count", "mean"}`` where ``count`` is the number of
    non-``None`` values and ``mean`` is ``None`` when there are none.
    """
    check_count(n_bins, "n_bins")
    total = len(values)
    bins = min(n_bins, total)
    out = []
    start = 0
    for b in range(bins):
        size = total // bins + (1 if b < total % bins else 0)
        chunk = [v for v in values[start:start + size] if v is not None]
        out.append({
            "first": start,
            "last": start + size - 1,
            "count": len(chunk),
            "mean": statistics.fmean(chunk) if chunk else None,
        })
        start += size
    return out


def forgetting_curve(
    lm, requests: Sequence[EditRequest], *, n_bins: int = 10, batch_size: int = 16,
    records: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per-edit efficacy after the stream and its binned means.

    ``requests`` must be in the order they were applied. ``records``: their
    :func:`~rlsedit.eval.counterfact.score_requests` records on the model as it is now, when
    the caller already scored them (a checkpoint just did); else the rewrite prompts are scored
    here. Returns ``{"per_edit": [{"position", "id", "success", "acc", "exact"}], "bins":
    {"success": [...], "acc": [...]}, "chance": {...}}``.
    """
    if not requests:
        raise EvalDataError("forgetting_curve needs the edited requests, in the order applied")
    if records is None:
        records = score_requests(lm, requests, groups=("rewrite",), batch_size=batch_size)
    elif [r["id"] for r in records] != [q.id for q in requests]:
        raise EvalDataError("forgetting_curve: the given records are not those of the requests, in order")
    per_edit = [
        {"position": i, "id": r["id"], "success": r["rewrite_success"], "acc": r["rewrite_acc"],
         "exact": r["rewrite_exact"]}
        for i, r in enumerate(records)
    ]
    return {
        "per_edit": per_edit,
        "bins": {
            "success": bin_by_position([e["success"] for e in per_edit], n_bins),
            "acc": bin_by_position([e["acc"] for e in per_edit], n_bins),
        },
        "chance": {"success": 0.5, "acc": 1.0 / len(lm.tokenizer)},
    }
