"""A session's edits as a peft LoRA adapter on the edited MLP down projections.

Every editor here changes only ``W_l`` of the edited layers, so the edited model is the base
model plus ``ΔW_l = W_l − W_0,l`` on those weights. In ``nn.Linear`` orientation
``ΔW (d_out, d_in) = U Σ Vᵀ`` (SVD), and a LoRA pair of rank ``r`` holds

    B = U_r Σ_r^{1/2}  (d_out, r),    A = Σ_r^{1/2} V_rᵀ  (r, d_in),    ΔW ≈ (α / r) · B A

with ``α = r`` (scaling 1). It is exact when ``r ≥ rank(ΔW)``; below, it is the truncated
SVD, the best rank-``r`` approximation in Frobenius norm (Eckart–Young), and the relative
error ``‖ΔW − BA‖_F / ‖ΔW‖_F`` is reported per layer. GPT-2's ``Conv1D`` keeps its weight as
``(d_in, d_out)``; the same A and B apply with peft's ``fan_in_fan_out``.

The adapter is written in peft's own layout (``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_{A,B}.weight`` keys),
so ``PeftModel.from_pretrained(base, DIR)`` loads it; writing it needs no peft.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import InvalidRequestError, StateError
from ..model.weights import get_W


@dataclass
class LoraReport:
    """What was written: the rank used, and per layer the numerical rank of ΔW and the
    relative reconstruction error of the saved (float32) factors."""

    path: Path
    rank: int
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "rank": self.rank, "layers": {str(k): v for k, v in self.layers.items()}}


def numerical_rank(S: torch.Tensor, scale: float, shape: tuple[int, int]) -> int:
    """Singular values above ``eps_32 · max(m, n) · scale`` count; ``scale = σ_max(W)``: ΔW is a
    difference of float32 weights, so its rounding noise is at the weights' scale, not ΔW's."""
    tol = torch.finfo(torch.float32).eps * max(shape) * scale
    return int((S > tol).sum())


def export_lora(session, out: str | Path, *, rank: int | None = None) -> LoraReport:
    """Write the session's edits as a LoRA adapter in ``out`` (a new or empty directory).

    ``rank=None`` picks the largest numerical rank of any layer's ΔW (exact); a smaller rank
    truncates (see the module docstring).
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise InvalidRequestError(f"--rank must be a positive integer, got {rank!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StateError(f"export target {out} exists and is not empty; choose a new path")
    lm, editor = session.lm, session.editor
    svd: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    ranks: dict[int, int] = {}
    for l in editor.layers:
        W = get_W(lm, l).double()  # (d_k, d_v)
        delta = (W - editor.W0[l].double()).T  # nn.Linear orientation (d_out = d_v, d_in = d_k)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        svd[l] = (delta, U, S, Vh)
        ranks[l] = numerical_rank(S, float(torch.linalg.matrix_norm(W, ord=2)), tuple(delta.shape))
    r = rank if rank is not None else max(1, max(ranks.values()))
    r = min(r, min(min(d.shape) for d, *_ in svd.values()))
    report = LoraReport(path=out, rank=r)
    tensors: dict[str, torch.Tensor] = {}
    for l, (delta, U, S, Vh) in svd.items():
        root = S[:r].sqrt()
        B = (U[:, :r] * root).float().contiguous()  # (d_out, r)
        A = (root[:, None] * Vh[:r]).float().contiguous()  # (r, d_in)
        module = f"{lm.arch.layers}.{l}.{lm.arch.mlp_down}"
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
        norm = float(torch.linalg.matrix_norm(delta))
        residual = float(torch.linalg.matrix_norm(delta - B.double() @ A.double()))
        report.layers[l] = {"rank_delta": ranks[l], "rank_saved": r, "delta_fro": norm,
                            "relative_error": residual / norm if norm > 0 else 0.0}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": lm.spec, "revision": None,
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "target_modules": [lm.arch.mlp_down], "layers_to_transform": list(editor.layers),
        "layers_pattern": lm.arch.layers.rsplit(".", 1)[-1], "fan_in_fan_out": bool(lm.arch.conv1d),
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "rlsedit_lora.json").write_text(json.dumps(
        report.to_dict() | {"base_fingerprint": lm.fingerprint, "method": session.store.meta["method"],
                            "edits_applied": len(session.index)}, indent=2, sort_keys=True) + "\n")
    return report
