"""AlphaEdit (Fang et al. 2025) on the shared key/value machinery.

The update is restricted to the null space of the corpus keys: with ``P`` the projector
onto the eigenvectors of E[kkᵀ] whose eigenvalues fall below ``nullspace_threshold``,
``G = Σ_past KKᵀ`` and residual ``R = V − KᵀW``:

    ΔW = (P(G + KKᵀ) + L2·I)⁻¹ P K R,     G ← G + KKᵀ
"""

from __future__ import annotations

from ..solvers.alphaedit import alphaedit_delta, null_space_projector
from .base import Editor
from .config import AlphaEditConfig
from .gram import AccumulatedGram


class AlphaEdit(AccumulatedGram, Editor):
    """Null-space constrained editing; past keys enter through their accumulated Gram."""

    config_class = AlphaEditConfig
    name = "alphaedit"

    def _init_state(self) -> None:
        self.projector_ = {l: null_space_projector(self.moments[l].double(), self.config.nullspace_threshold)
                           for l in self.layers}
        self._init_gram()

    def held_tensors(self):
        # the projectors are rebuilt from E[kkᵀ] on load, so they are held but never saved
        return super().held_tensors() | {f"layers.{l}.projector": P for l, P in self.projector_.items()}

    def _solve(self, layer, K, V, W):
        R = (V - K.T @ W).double()
        delta = alphaedit_delta(self.projector_[layer], K.double(), R, self.gram_[layer], self.config.L2)
        return W + delta.to(W.dtype), self._grown_gram(layer, K)
