"""What one accepted batch of edits contributed: the unit the journal stores and undo reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EditRecord:
    """What one accepted batch contributed; enough to replay or undo it.

    Attributes:
        ids: the edit ids of the batch, in column order.
        tensors: ``"layers.<l>.K"`` (d_k, u) and ``"layers.<l>.V"`` (u, d_v) per edited layer
            (float32), or ``"layers.<l>.W"`` (d_k, d_v) for methods without keys (FT); with
            ``preserve_count`` also ``"layers.<l>.Kp"``/``"layers.<l>.Vp"`` (:mod:`rlsedit.locate.preserve`).
        info: JSON-able diagnostics (target losses, steps).
    """

    ids: tuple[str, ...]
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
