"""The edit stream of the method benchmark: which records, in which order, when to evaluate,
and the digest that identifies the stream when a run resumes."""

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
