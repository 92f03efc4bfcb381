"""MEMIT and sequential MEMIT on the shared key/value machinery.

MEMIT (Meng et al. 2023, eq. 14) in our orientation, per layer and batch, with residual
``R = V − KᵀW`` (u, d_v) and anchor ``A = n·E[kkᵀ]``:

    ΔW = (A + KKᵀ)⁻¹ K R                                   [memit]
    ΔW = (A + G + KKᵀ)⁻¹ K R,   G ← G + KKᵀ                [memit-seq, G = Σ_past KKᵀ]

``memit`` forgets earlier batches (its anchor only protects corpus keys); ``memit-seq``
keeps their Gram and equals RLSEdit with λ = 0, μ = 1 at every batch, at the cost of a
d_k×d_k solve per batch instead of RLSEdit's O(d_k²u) recursion.
"""

from __future__ import annotations

import torch

from ..solvers.memit import memit_delta
from .base import Editor
from .config import MEMITConfig, MEMITSeqConfig
from .gram import AccumulatedGram


class MEMIT(Editor):
    """Mass-editing memory in a transformer, applied batch after batch with no memory of the stream."""

    config_class = MEMITConfig
    name = "memit"

    def _anchor(self, layer: int) -> torch.Tensor:
        return self.anchor_weight * self.moments[layer].double()  # A = n·E[kkᵀ]

    def _solve(self, layer, K, V, W):
        R = (V - K.T @ W).double()  # (u, d_v) residual
        return W + memit_delta(self._anchor(layer), K.double(), R).to(W.dtype), None


class MEMITSeq(AccumulatedGram, MEMIT):
    """Sequential MEMIT: MEMIT's solve with the accumulated Gram of all earlier keys."""

    config_class = MEMITSeqConfig
    name = "memit-seq"

    def _init_state(self) -> None:
        self._init_gram()

    def _solve(self, layer, K, V, W):
        R = (V - K.T @ W).double()
        delta = memit_delta(self._anchor(layer) + self.gram_[layer], K.double(), R)
        return W + delta.to(W.dtype), self._grown_gram(layer, K)
