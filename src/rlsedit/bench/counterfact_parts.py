"""CounterFact records scored a part at a time, each part appended to a file as it is done.

Scoring every edit's prompts takes hours at 10,000 edits on a CPU (the unedited row, a
checkpoint late in the stream), longer than a working session may have left. Each part of
``PART`` edits is appended to a JSONL file with the identity of the weights it was scored on;
a restart reads the parts back and scores only those still missing, provided the weights are
the same (a checkpoint's edited weights rebuilt bit for bit). Parts batch the prompts
differently from one pass over all edits: the records agree with one pass to float rounding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from ..errors import StateMismatchError
from ..requests import EditRequest
from .resume import append_progress, read_progress

log = logging.getLogger(__name__)

PART = 500  # edits per part: minutes of CPU each on the real models


def counterfact_in_parts(lm, requests: Sequence[EditRequest], path: Path, weights: dict[str, Any], *,
                        batch_size: int, pre_edit_locality: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """CounterFact records of ``requests`` on ``lm``
    (:func:`~rlsedit.eval.counterfact.counterfact_records`), ``PART`` edits at a time, each part
    appended to ``path`` with ``weights`` (what identifies the weights scored). Parts already in
    ``path`` are read back when they were scored on the same ``weights``; parts of other weights
    (a checkpoint rebuilt only to float rounding) are deleted and scored again."""
    from ..eval.counterfact import counterfact_records

    lines = read_progress(path, redo="delete this file to score its edits again")
    if any(line.get("weights") != weights for line in lines):
        log.warning("%s: parts scored on other weights than %s; scoring them again", path, weights)
        path.unlink()
        lines = []
    done = [r for line in lines for r in line["records"]]
    if [r["id"] for r in done] != [q.id for q in requests[:len(done)]]:
        raise StateMismatchError(f"{path} holds records of other edits than this benchmark's; delete it")
    if done:
        log.info("%s: %d of %d edits' records read back", path.name, len(done), len(requests))
    for first in range(len(done), len(requests), PART):
        part = counterfact_records(lm, requests[first:first + PART], batch_size=batch_size,
                                   pre_edit_locality=pre_edit_locality)
        append_progress(path, {"first": first, "weights": weights, "records": part})
        done += part
        log.info("%s: CounterFact records of %d of %d edits", path.name, len(done), len(requests))
    return done
