"""Read and write the edited weight in the editors' orientation ``W (d_k, d_v)``.

This is the only place that knows how each family stores its down projection:
``nn.Linear.weight`` is ``(d_v, d_k)`` (so ``W = weight.T``), GPT-2 ``Conv1D.weight`` is
already ``(d_k, d_v)`` (declared by ``Architecture.conv1d``).
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import NumericalError, StateMismatchError
from .arch import resolve


def down_proj(lm, layer: int) -> torch.nn.Module:
    """The down-projection module of block ``layer``."""
    return resolve(lm.model, f"{lm.arch.layers}.{layer}.{lm.arch.mlp_down}")


def block(lm, layer: int) -> torch.nn.Module:
    return resolve(lm.model, f"{lm.arch.layers}.{layer}")


def get_W(lm, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A copy of block ``layer``'s down-projection weight as ``W (d_k, d_v)``."""
    weight = down_proj(lm, layer).weight.detach()
    W = weight if lm.arch.conv1d else weight.T
    return W.to(dtype=dtype, copy=True).contiguous()


def get_bias(lm, layer: int) -> torch.Tensor | None:
    """The down projection's bias ``(d_v,)``, or None."""
    bias = getattr(down_proj(lm, layer), "bias", None)
    return None if bias is None else bias.detach().float().clone()


def set_W(lm, layer: int, W: torch.Tensor) -> None:
    """Write ``W (d_k, d_v)`` into block ``layer``; refuses non-finite values and wrong shapes."""
    param = down_proj(lm, layer).weight
    expected = tuple(param.shape) if lm.arch.conv1d else tuple(param.shape[::-1])
    if tuple(W.shape) != expected:
        raise StateMismatchError(
            f"layer {layer}: weight of shape {tuple(W.shape)} does not fit the model's "
            f"down projection, expected (d_k, d_v) = {expected}"
        )
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {layer}: refusing to write a weight with non-finite values")
    with torch.no_grad():
        src = W if lm.arch.conv1d else W.T
        param.copy_(src.to(dtype=param.dtype, device=param.device))


def weights_sha256(lm) -> str:
    """sha256 over every parameter (name, dtype, shape, bytes), in ``state_dict`` order."""
    digest = hashlib.sha256()
    for name, tensor in lm.model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
