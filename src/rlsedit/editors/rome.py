"""ROME (Meng et al. 2022) on the shared key/value machinery: one rank-one update per request.

At the single edited layer, per request, as ``kmeng01/rome`` (``rome_main``, ``compute_u``,
``compute_v``) does it:

* prefixes: ROME's own 21 (:func:`~rlsedit.locate.prefixes.rome_context_prefixes`,
  ``context_template_length_params = [[5, 10], [10, 10]]``);
* left vector ``u = E[kkᵀ]⁻¹ k̄`` with ``k̄`` the key averaged uniformly over the prefixes
  (``compute_u``);
* value target: ``δ`` added to the MLP output ``m`` at the subject's last token, optimised
  with the size term ``v_weight_decay · ‖δ‖/‖m‖²`` and clamped to
  ``‖δ‖ ≤ clamp_norm_factor · ‖m‖`` (4 in ROME's files), ``m`` read on the bare prompt
  (``compute_v``'s ``target_init``);
* right vector from the key ``k`` of the bare prompt itself:

      ΔW = u (v* − Wᵀk)ᵀ / (uᵀk),     v* = Wᵀk + δ

  so the bare prompt's MLP output moves by exactly ``δ`` (the rank-one property).

The target optimisation (:func:`~rlsedit.locate.targets.compute_targets`) measures ``δ``
against the residual state ``h`` after the edited block; with one request at a time the MLP's
norm enters through its factors: ``clamp_norm_factor·‖m‖/‖h‖`` and ``v_weight_decay·‖h‖²/‖m‖²``.
Where a norm follows the MLP (Gemma 3), ``m`` is that norm's output, what joins the residual
stream. Requests of a batch are applied one after another, each with targets computed on the
model as the previous one left it (ROME edits one fact at a time); a target log, where one is
set, holds each request's residual on its own.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import NumericalError
from ..model.arch import resolve
from ..model.weights import block, down_proj, get_W, set_W
from ..requests import SUBJECT_SLOT
from ..solvers.rome import rome_delta, rome_left_vector
from .base import EditRecord, Editor, Proposal, _check_finite, _PhaseClock
from .config import ROMEConfig


def mlp_output_at_subject(lm, layer: int, request) -> torch.Tensor:
    """``m (d_model,)`` float32: what block ``layer``'s MLP adds to the residual stream at the
    subject's last token of the request's bare prompt (after the post-MLP norm where there is one)."""
    from ..locate.forward import read_module
    from ..locate.tokens import encode_through_subject, pad_id, pad_right, prompt_texts

    norm_path = lm.arch.post_mlp_norm
    module = resolve(block(lm, layer), norm_path) if norm_path is not None else down_proj(lm, layer)
    ids, positions = encode_through_subject(lm, prompt_texts([request], [SUBJECT_SLOT]))
    input_ids, attention_mask = pad_right(ids, pad_id(lm), lm.device)
    out = read_module(lm, module, input_ids, attention_mask, read="output")  # (1, L, d_model)
    return out[0, positions[0]].float()


class ROME(Editor):
    config_class = ROMEConfig
    name = "rome"

    @classmethod
    def layers_for(cls, lm, config):
        if config.layers is not None:
            return super().layers_for(lm, config)
        default = lm.default_layers()
        return (default[len(default) // 2],)

    @classmethod
    def target_log_entries(cls, requests):
        return [(r.id,) for r in requests]

    def _make_prefixes(self) -> list[str]:
        from ..locate.prefixes import rome_context_prefixes

        return rome_context_prefixes(self.lm, self.config.context_template_length_params, seed=self.config.seed)

    def _solve(self, layer, K, V, W, K_mean=None):
        """Sequential rank-one updates: column ``j`` of ``K`` (bare-prompt keys) is mapped onto row
        ``j`` of ``V``, along ``u = E⁻¹ k̄_j`` from column ``j`` of ``K_mean`` (default ``K``)."""
        K_mean = K if K_mean is None else K_mean
        W = W.double()
        E = self.moments[layer].double()
        for j in range(K.shape[1]):  # ROME applies its requests one after another
            k = K[:, j:j + 1].double()
            W = W + rome_delta(W, k, V[j:j + 1].double(), rome_left_vector(E, K_mean[:, j:j + 1].double()))
        return W.float(), None

    def _edit_one(self, request, clock) -> tuple[dict[str, torch.Tensor], dict]:
        """Compute and write one request's rank-one update; its record tensors and info."""
        from ..locate.keys import compute_keys
        from ..locate.targets import compute_targets, hidden_at_subject
        from ..locate.targets_reference import compute_targets_reference

        c, lm, layer = self.config, self.lm, self.layers[0]
        ids = (request.id,)
        # logged per request, not per batch: each request is optimised on the model its
        # predecessor left, so a stop mid-batch keeps the requests already done
        logged = None if self.target_log is None else self.target_log.lookup(ids)
        result = z = None
        with clock("targets"):
            h = hidden_at_subject(lm, layer, [request]).float()  # (1, d_model) residual after the block
            if logged is None:
                m = mlp_output_at_subject(lm, layer, request)  # (d_model,) the MLP's share of h
                ratio = float(m.norm() / h.norm())  # ‖m‖/‖h‖
                if not ratio > 0:
                    raise NumericalError(f"edit {request.id!r}: the MLP output at the subject is zero; "
                                         "ROME's clamp and size term are relative to it")
                # ‖δ‖ ≤ clamp·‖m‖ and wd·‖δ‖/‖m‖², written against the ‖h‖ that compute_targets uses
                target_config = dataclasses.replace(self._target_config(),
                                                    clamp_norm_factor=c.clamp_norm_factor * ratio,
                                                    weight_decay=c.v_weight_decay / ratio ** 2)
                optimise = compute_targets if self.targets == "batched" else compute_targets_reference
                result = optimise(lm, layer, [request], self.prefixes_, target_config)
                z = result.z.float()
                _check_finite("value target z", z, ids)
            if self.target_log is not None:
                z = self._logged_target(ids, z, h, logged)
        with clock("keys"):
            K_mean = compute_keys(lm, layer, [request], self.prefixes_, average=c.key_average).float()  # (d_k, 1)
            K = compute_keys(lm, layer, [request], [SUBJECT_SLOT]).float()  # (d_k, 1) bare prompt
            _check_finite(f"layers.{layer}.K", K, ids)
            _check_finite(f"layers.{layer}.K_mean", K_mean, ids)
        with clock("solve"):
            W = get_W(lm, layer)
            V = self._absolute_targets(layer, K, W, z - h)  # v* = Wᵀk + δ   (1, d_v)
            _check_finite(f"layers.{layer}.V", V, ids)
            W_new, _ = self._solve(layer, K, V, W, K_mean)
            _check_finite(f"layers.{layer}.W", W_new, ids)
            set_W(lm, layer, W_new)
        tensors = {f"layers.{layer}.K": K, f"layers.{layer}.V": V, f"layers.{layer}.K_mean": K_mean}
        if result is None:
            return tensors, {"target_loss": [], "target_steps": [], "replayed": True}
        info = {"target_loss": [float(x) for x in result.losses], "target_steps": [int(x) for x in result.steps],
                "replayed": False}
        return tensors, info

    def _compute_batch(self, requests):
        clock = _PhaseClock(self.lm.device)
        parts = [self._edit_one(request, clock) for request in requests]  # each sees its predecessor's model
        tensors = {key: torch.cat([t[key] for t, _ in parts], dim=0 if key.endswith(".V") else 1).contiguous()
                   for key in parts[0][0]}
        info = {key: [x for _, i in parts for x in i[key]] for key in ("target_loss", "target_steps")}
        replayed = sum(i["replayed"] for _, i in parts)
        if replayed == len(parts):
            info["targets_replayed"] = True
        elif replayed:  # a batch stopped part-way, resumed: these requests timed no optimisation
            info["targets_replayed_edits"] = replayed
        info["seconds"] = clock.seconds
        return EditRecord(ids=tuple(r.id for r in requests), tensors=tensors, info=info), {}

    def apply_record(self, record: EditRecord) -> None:
        """Replay a journaled batch: its bare-prompt keys, averaged keys and targets, in order.
        Records written before the averaged keys were kept hold only ``K``, used for both."""
        old = {l: get_W(self.lm, l) for l in self.layers}
        layer = self.layers[0]
        try:
            K, V = record.tensors[f"layers.{layer}.K"], record.tensors[f"layers.{layer}.V"]
            W_new, _ = self._solve(layer, K, V, get_W(self.lm, layer), record.tensors.get(f"layers.{layer}.K_mean"))
            set_W(self.lm, layer, W_new)
        except BaseException:
            self._restore_weights(old)
            raise
        Proposal(self, record, {}, old).commit()
