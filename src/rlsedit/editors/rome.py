"""ROME (Meng et al. 2022) on the shared key/value machinery: one rank-one update per request.

At the single edited layer, with ``u = E[kkᵀ]⁻¹ k`` and absolute target ``v``:

    ΔW = u (v − Wᵀk)ᵀ / (uᵀk)

Requests of a batch are applied one after another, each with targets computed on the model
as the previous one left it (ROME edits one fact at a time).
"""

from __future__ import annotations

import torch

from ..solvers.rome import rome_delta, rome_left_vector
from .base import EditRecord, Editor
from .config import ROMEConfig


class ROME(Editor):
    config_class = ROMEConfig
    name = "rome"

    @classmethod
    def layers_for(cls, lm, config):
        if config.layers is not None:
            return super().layers_for(lm, config)
        default = lm.default_layers()
        return (default[len(default) // 2],)

    def _solve(self, layer, K, V, W):
        W = W.double()
        E = self.moments[layer].double()
        for j in range(K.shape[1]):  # sequential rank-one updates, as ROME applies them
            k = K[:, j:j + 1].double()
            W = W + rome_delta(W, k, V[j:j + 1].double(), rome_left_vector(E, k))
        return W.float(), None

    def _compute_batch(self, requests):
        records, states = [], {}
        for request in requests:  # each request sees the model its predecessor left
            record, states = super()._compute_batch([request])
            records.append(record)
        tensors = {}
        for key in records[0].tensors:
            dim = 1 if key.endswith(".K") else 0
            tensors[key] = torch.cat([r.tensors[key] for r in records], dim=dim).contiguous()
        seconds: dict[str, float] = {}
        for r in records:
            for phase, t in r.info.get("seconds", {}).items():
                seconds[phase] = seconds.get(phase, 0.0) + t
        info = {key: [x for r in records for x in r.info.get(key, [])] for key in ("target_loss", "target_steps")}
        info["seconds"] = seconds
        return EditRecord(ids=tuple(r.id for r in requests), tensors=tensors, info=info), states
