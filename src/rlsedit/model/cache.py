"""What a cached (incremental) forward pass of a transformers causal LM needs, whatever its version.

transformers renamed the key/value cache argument and output field (``past_key_values`` →
``cache`` in 5.2x); :func:`cache_kwarg` and :func:`cache_of` read whichever the installed
version has. :func:`positions_from_mask` gives padded rows the positions an unpadded row would
have, so left padding (or a masked gap) does not shift them.
"""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out) -> object:
    """The KV cache a forward pass returned (``out.cache`` or ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``pos_t = (Σ_{s≤t} mask_s) − 1``, clamped at 0 on the padding: ``(B, L)``."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
