"""Each batch's value-target residuals on disk, so a long benchmark resumes on a new machine.

A method's session (journal and snapshots, hundreds of MB at 10,000 edits) stays on the
machine that ran it; what a later machine gets is the committed benchmark folder. The
expensive part of a batch is finding its value targets ``z`` (the Adam loop); keys, the
solve and the journal take a few hundredths of a second per edit. So the benchmark keeps,
per batch, ``δ = z − h`` (``h``: the state after the top edited layer at each subject's
last token before the batch writes anything; :meth:`Editor._logged_target`) in a small
safetensors file, and a resumed run rebuilds the batches it has no journal for from them
instead of optimising again. ROME, which optimises one request at a time on the model its
predecessor left, logs one entry per request (``Editor.target_log_entries``), so a stop in the
middle of one of its long batches keeps the requests already done.

``δ`` is stored as float16 (half the size of float32: 1.1 KB per edit at d_model = 576) when
every entry fits float16's range, else as float32. The run that writes a batch uses the
stored (rounded) ``δ`` too, so the run and its replay build the same ``z`` from the same
``h`` and write the same weights; the rounding moves each entry of an edit's residual by at
most 2⁻¹¹ of its magnitude (entries above float16's smallest normal, 6·10⁻⁵).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import StateCorruptError, StateMismatchError

FORMAT = "rlsedit.target-log/1"
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def batch_key(ids: Sequence[str]) -> str:
    """The file stem of the batch with edit ids ``ids`` (in order)."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:20]


class TargetLog:
    """Target residuals ``δ`` of batches, keyed by their edit ids (one file per batch in ``folder``).

    The editor calls :meth:`lookup` before optimising a batch and :meth:`record` after (see
    ``Editor.target_log``); the benchmark asks :meth:`has_batch` which lost batches it can rebuild.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, ids: Sequence[str]) -> Path:
        return self.folder / f"{batch_key(ids)}.safetensors"

    def has(self, ids: Sequence[str]) -> bool:
        return self._path(ids).is_file()

    def has_batch(self, editor, requests: Sequence) -> bool:
        """Whether every entry ``editor`` (an editor or its class) logs for the batch ``requests`` is here."""
        return all(self.has(ids) for ids in editor.target_log_entries(requests))

    def lookup(self, ids: Sequence[str]) -> torch.Tensor | None:
        """The stored ``δ`` (u, d_model) float32 of the batch ``ids``, or None when not logged."""
        from ..session.tensorfile import decode

        path = self._path(ids)
        if not path.is_file():
            return None
        tensors, metadata = decode(path.read_bytes(), path, what="target log entry")
        if metadata.get("format") != FORMAT or set(tensors) != {"delta"}:
            raise StateCorruptError(f"{path} is not a target log entry ({FORMAT})")
        stored_ids = json.loads(metadata.get("ids", "null"))
        if stored_ids != list(ids):
            raise StateMismatchError(f"{path} holds the targets of batch {stored_ids}, not of {list(ids)}")
        delta = tensors["delta"].float()
        if delta.ndim != 2 or delta.shape[0] != len(ids) or not torch.isfinite(delta).all():
            raise StateCorruptError(f"{path}: residuals of shape {tuple(delta.shape)} (or non-finite) "
                                    f"for {len(ids)} edits")
        return delta

    def record(self, ids: Sequence[str], delta: torch.Tensor) -> torch.Tensor:
        """Store ``δ`` of the batch ``ids`` and return it as stored (float32, possibly rounded)."""
        from ..session.atomic import atomic_write_bytes
        from ..session.tensorfile import encode

        delta = delta.detach().float().cpu()
        if not torch.isfinite(delta).all():
            raise StateMismatchError(f"target residuals of batch {list(ids)[:3]}… are not finite; not logged")
        stored = delta.half() if float(delta.abs().max()) <= FLOAT16_MAX else delta
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT, "ids": json.dumps(list(ids))}
        atomic_write_bytes(self._path(ids), encode({"delta": stored.contiguous()}, metadata))
        return stored.float()
