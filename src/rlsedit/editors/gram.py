"""The accumulated key Gram ``G = Σ_past K_iK_iᵀ`` that MEMIT-seq and AlphaEdit carry per layer."""

from __future__ import annotations

import torch


class AccumulatedGram:
    """Mixin for an :class:`~rlsedit.editors.base.Editor` whose state is ``gram_[layer] (d_k, d_k)``
    float64; its ``_solve`` returns the updated Gram ``G + KKᵀ`` as the layer's new state."""

    def _init_gram(self) -> None:
        self.gram_ = {l: torch.zeros(self.lm.d_k, self.lm.d_k, dtype=torch.float64, device=self.lm.device)
                      for l in self.layers}

    def _grown_gram(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        K64 = K.double()
        return self.gram_[layer] + K64 @ K64.T  # G_t = G_{t-1} + K_tK_tᵀ

    def _commit_state(self, new_state) -> None:
        self.gram_.update(new_state)

    def method_state_dict(self):
        return {f"layers.{l}.gram": g.contiguous() for l, g in self.gram_.items()}

    def load_method_state_dict(self, tensors):
        self.gram_ = {l: tensors[f"layers.{l}.gram"].to(self.lm.device, torch.float64).clone() for l in self.layers}
