"""AlphaEdit (Fang et al. 2025) on the shared key/value machinery.

The update is restricted to the null space of the corpus keys: with ``P`` the projector
onto the eigenvectors of E[kkᵀ] of smallest eigenvalue — those holding at most
``nullspace_energy`` of tr(E[kkᵀ]), or, for official hparams files, those below the absolute
``nullspace_threshold`` (:func:`~rlsedit.solvers.alphaedit.null_space_projector`) —
``G = Σ_past KKᵀ`` and residual ``R = V − KᵀW``:

    ΔW = (P(G + KKᵀ) + L2·I)⁻¹ P K R,     G ← G + KKᵀ

:meth:`AlphaEdit.diagnostics` reports per layer ``nullspace_rank`` = rank(P) and
``nullspace_energy`` = ‖P K₀‖²/‖K₀‖² = tr(P E P)/tr(E), how far ``P K₀ ≈ 0`` holds.
"""

from __future__ import annotations

import torch

from ..solvers.alphaedit import alphaedit_delta, null_space_energy, null_space_projector
from .base import Editor
from .config import AlphaEditConfig
from .gram import AccumulatedGram


class AlphaEdit(AccumulatedGram, Editor):
    """Null-space constrained editing; past keys enter through their accumulated Gram."""

    config_class = AlphaEditConfig
    name = "alphaedit"

    def _init_state(self) -> None:
        c = self.config
        self.projector_ = {l: null_space_projector(self.moments[l].double(), c.nullspace_threshold,
                                                   energy=c.nullspace_energy) for l in self.layers}
        # rank(P) and tr(PEP)/tr(E) depend only on E and the rule: computed once, reported always
        self.nullspace_ = {l: {"nullspace_rank": int(round(float(torch.diagonal(P).sum()))),
                               "nullspace_energy": null_space_energy(self.moments[l], P)}
                           for l, P in self.projector_.items()}
        self._init_gram()

    def diagnostics(self):
        out = super().diagnostics()
        for l in self.layers:
            out[str(l)].update(self.nullspace_[l])
        return out

    def held_tensors(self):
        # the projectors are rebuilt from E[kkᵀ] on load, so they are held but never saved
        return super().held_tensors() | {f"layers.{l}.projector": P for l, P in self.projector_.items()}

    def _solve(self, layer, K, V, W):
        R = (V - K.T @ W).double()
        delta = alphaedit_delta(self.projector_[layer], K.double(), R, self.gram_[layer], self.config.L2)
        return W + delta.to(W.dtype), self._grown_gram(layer, K)
