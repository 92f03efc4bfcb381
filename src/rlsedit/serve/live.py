"""The model queries read: a copy of the session's model, and the weight version it holds.

Why a copy: an editor computes a batch *in* the session's model (``Editor.propose`` writes
layer ``l``'s new weight before it reads the keys of layer ``l+1``, and the value-target
optimisation hooks its forward passes), so queries cannot read that model while an edit is
computed. They read this copy instead; once a batch is durable in the journal, only the
edited layers' down projections ``W_l`` are copied over, under the write lock, between two
decode waves. The copy costs one model's memory (540 MB for SmolLM2 in float32).

The weight version is the number of journal entries (accepted batches plus undos): it only
grows, it is what the state on disk holds after each acknowledgement, and a restarted
server reads the same number back from the journal.
"""

from __future__ import annotations

import copy
import threading

import torch

from ..model.weights import get_W, set_W
from .rwlock import ReadWriteLock


def fingerprint(version: int) -> str:
    """``system_fingerprint`` of a response computed with weight version ``version``."""
    return f"wv{version}"


class LiveModel:
    """The served model copy; read it only inside ``with live.lock.read():``."""

    def __init__(self, source_lm, version: int) -> None:
        self.lm = copy.deepcopy(source_lm)  # model, tokenizer and arch: nothing shared with the editor
        self.lm.model.eval()
        self.lm.model.requires_grad_(False)
        self.version = version
        self.lock = ReadWriteLock()
        # the tokenizer is used by request handlers (encode) and the decode thread (decode)
        self.tokenizer_lock = threading.Lock()
        self.on_publish: list = []  # callables(version), run after each publish on the publishing thread

    @property
    def context(self) -> int | None:
        value = getattr(self.lm.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def encode(self, text: str) -> list[int]:
        from ..eval.scoring import encode_prompt

        with self.tokenizer_lock:
            return encode_prompt(self.lm.tokenizer, text)

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    def publish(self, source_lm, layers, version: int) -> None:
        """Copy ``W_l`` of ``layers`` from the session's model and adopt ``version``.

        The weights are read before the write lock is taken, so readers wait only for the copy.
        """
        weights = {l: get_W(source_lm, l) for l in layers}
        with self.lock.write():
            for l, W in weights.items():
                set_W(self.lm, l, W)
            self.version = version
        for listener in self.on_publish:
            listener(version)

    def weights_equal(self, source_lm, layers) -> bool:
        """Whether the served copy holds exactly the session's edited weights (a self-check)."""
        return all(torch.equal(get_W(self.lm, l), get_W(source_lm, l)) for l in layers)
