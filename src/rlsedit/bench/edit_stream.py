"""The edit stream of the method benchmark: which records, in which order, when to evaluate,
when a collapsed method stops, and the digest that identifies the stream when a run resumes."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Sequence

from ..errors import InvalidRequestError
from ..requests import EditRequest, read_requests


def checkpoint_batches(n_batches: int, checkpoints: int) -> list[int]:
    """The batch counts after which to evaluate: ``checkpoints`` evenly spaced, always the last.

    ``checkpoint_batches(10, 4) == [3, 5, 8, 10]`` (``round(n·j/k)`` for ``j = 1..k``, deduplicated).
    """
    if n_batches <= 0 or checkpoints <= 0:
        raise InvalidRequestError(f"need positive batches and checkpoints, got {n_batches}, {checkpoints}")
    k = min(checkpoints, n_batches)
    return sorted({max(1, round(n_batches * j / k)) for j in range(1, k + 1)})


def checkpoint_batches_at_edits(n: int, batch_size: int, edits: Sequence[int]) -> dict[int, list[int]]:
    """The batches after which to evaluate for the edit counts ``edits``, each mapped to the counts it
    stands for: the first batch whose cumulative edit count reaches the value, and always the last.

    With ``n=10, batch_size=4`` (batches end at 4, 8, 10 edits), ``edits=(5, 10)`` gives
    ``{2: [5], 3: [10]}``: the checkpoint asked at 5 is evaluated at 8 edits. A value above ``n``
    is refused (the stream never reaches it).
    """
    if n <= 0 or batch_size <= 0:
        raise InvalidRequestError(f"need positive n and batch_size, got {n}, {batch_size}")
    n_batches = -(-n // batch_size)
    out: dict[int, list[int]] = {}
    for value in sorted(set(edits)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequestError(f"checkpoint edit counts must be positive integers, got {value!r}")
        if value > n:
            raise InvalidRequestError(f"checkpoint at {value} edits lies beyond the stream's n={n} edits")
        out.setdefault(-(-value // batch_size), []).append(value)  # ceil(value / batch_size)
    out.setdefault(n_batches, [])
    return dict(sorted(out.items()))


def checkpoint_plan(n: int, batch_size: int, checkpoints: int, checkpoint_edits: Sequence[int] = ()
                    ) -> dict[int, list[int]]:
    """Batch → the edit counts asked for there: :func:`checkpoint_batches_at_edits` when
    ``checkpoint_edits`` is given, else ``checkpoints`` evenly spaced batches (no counts asked)."""
    if checkpoint_edits:
        return checkpoint_batches_at_edits(n, batch_size, checkpoint_edits)
    return {b: [] for b in checkpoint_batches(-(-n // batch_size), checkpoints)}


CHANCE_EFFICACY = 0.5  # ROME's efficacy compares p(new) with p(true): a coin flip scores 0.5
STOP_REASON = "last-batch efficacy below chance at two checkpoints"


def below_chance_twice(efficacies: Sequence[float | None], chance: float = CHANCE_EFFICACY) -> bool:
    """The collapse rule: the last two checkpoints' last-batch efficacies are both below ``chance``.

    ``[0.4, 0.3]`` stops; ``[0.4, 0.6, 0.3]`` does not (the two below are not consecutive); a
    checkpoint without a value (``None``) breaks a run of lows.
    """
    last = list(efficacies)[-2:]
    return len(last) == 2 and all(v is not None and v < chance for v in last)


def collapse_stop(records: Sequence[dict]) -> dict | None:
    """Where a method stopped under :func:`below_chance_twice`, from its progress records (in
    batch order): ``{"at_edits", "at_batch", "reason", "last_batch_efficacy"}``, or ``None``."""
    seen: list[float | None] = []
    for rec in sorted(records, key=lambda r: r["batch"]):
        evaluation = rec.get("evaluation")
        if evaluation is None or "last_batch_efficacy" not in evaluation:
            continue
        seen.append(evaluation["last_batch_efficacy"])
        if below_chance_twice(seen):
            return {"at_edits": rec["edits"], "at_batch": rec["batch"], "reason": STOP_REASON,
                    "last_batch_efficacy": seen[-2:]}
    return None


def select_edits(path: str | Path, n: int, *, shuffle: bool = False, seed: int = 0) -> list[EditRequest]:
    """The first ``n`` records of ``path`` (file order), or those records in a seeded random order."""
    requests = read_requests(path, limit=n)
    if len(requests) < n:
        raise InvalidRequestError(f"{path} holds {len(requests)} records, fewer than n={n}")
    if shuffle:
        random.Random(seed).shuffle(requests)
    return requests


def edit_stream_sha256(requests: Sequence[EditRequest]) -> str:
    """Identifies the edit stream (ids and contents, in order) for resume checks."""
    digest = hashlib.sha256()
    for r in requests:
        digest.update(json.dumps(r.to_record(), sort_keys=True).encode())
    return digest.hexdigest()
