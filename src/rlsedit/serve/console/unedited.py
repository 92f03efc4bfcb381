"""The unedited model: the served copy with the edited layers' down projections set back to W0.

Why not swap W0 into the served copy under the write lock: every query would wait for the
comparison's whole decode. Why not a third full copy: it costs a model's memory (540 MB for
SmolLM2 in float32). This copy shares every other tensor with the served copy — those are
never written (:meth:`..live.LiveModel.publish` writes only the edited layers' ``W_l``, in
place), so reading them from a second thread is safe — and owns only ``W0_l`` of the edited
layers (3 × 1536 × 576 floats ≈ 10 MB for SmolLM2). It is built on first use, so a server
whose console never compares pays nothing.
"""

from __future__ import annotations

import copy
import threading
from typing import Sequence

from ...model.weights import down_proj, set_W
from ..decode import Row, decode_rows


class UneditedModel:
    def __init__(self, live, W0: dict[int, object]) -> None:
        self._live = live
        self._W0 = W0  # layer -> W0 (d_k, d_v); the editor's, never written after the state opened
        self._lm = None
        self._lock = threading.RLock()  # one build, and one decode at a time on this copy and its tokenizer

    def model(self):
        """The unedited model (built on the first call)."""
        with self._lock:
            if self._lm is None:
                self._lm = self._build()
            return self._lm

    def _build(self):
        live = self._live
        with live.lock.read():
            edited = {id(down_proj(live.lm, l).weight) for l in self._W0}
            shared = {id(t): t for t in (*live.lm.model.parameters(), *live.lm.model.buffers())
                      if id(t) not in edited}
            lm = copy.deepcopy(live.lm, memo=dict(shared))  # memo: these tensors are reused, not copied
        for layer, W0 in self._W0.items():
            set_W(lm, layer, W0)
        return lm

    def decode(self, rows: Sequence[Row]) -> None:
        """Decode ``rows`` on the unedited weights (blocking; call it off the event loop)."""
        with self._lock:
            lm = self.model()
            decode_rows(lm, rows, lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True))
