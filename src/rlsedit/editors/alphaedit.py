"""AlphaEdit (Fang et al. 2025) on the shared key/value machinery.

The update is restricted to the null space of the corpus keys: with ``P`` the projector
onto the eigenvectors of E[kkᵀ] whose eigenvalues fall below ``nullspace_threshold``,
``G = Σ_past KKᵀ`` and residual ``R = V − KᵀW``:

    ΔW = (P(G + KKᵀ) + L2·I)⁻¹ P K R,     G ← G + KKᵀ
"""

from __future__ import annotations

import torch

from ..solvers.alphaedit import alphaedit_delta, null_space_projector
from .base import Editor
from .config import AlphaEditConfig


class AlphaEdit(Editor):
    """Null-space constrained editing; past keys enter through their accumulated Gram."""

    config_class = AlphaEditConfig
    name = "alphaedit"

    def _init_state(self) -> None:
        self.projector_ = {l: null_space_projector(self.moments[l].double(), self.config.nullspace_threshold)
                           for l in self.layers}
        self.gram_ = {l: torch.zeros(self.lm.d_k, self.lm.d_k, dtype=torch.float64, device=self.lm.device) for l in self.layers}

    def _solve(self, layer, K, V, W):
        R = (V - K.T @ W).double()
        K64 = K.double()
        delta = alphaedit_delta(self.projector_[layer], K64, R, self.gram_[layer], self.config.L2)
        return W + delta.to(W.dtype), self.gram_[layer] + K64 @ K64.T

    def _commit_state(self, new_state) -> None:
        self.gram_.update(new_state)

    def method_state_dict(self):
        return {f"layers.{l}.gram": g.contiguous() for l, g in self.gram_.items()}

    def load_method_state_dict(self, tensors):
        self.gram_ = {l: tensors[f"layers.{l}.gram"].to(self.lm.device, torch.float64).clone() for l in self.layers}
