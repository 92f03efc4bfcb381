"""A value target through a post-MLP norm (Gemma 2/3's ``post_feedforward_layernorm``).

Where a block adds ``y = norm(v)`` to the residual stream instead of the MLP output ``v``
itself, a wanted change of the stream, ``y* = y + R``, is a value target only once mapped back
through the norm: ``v*`` with ``norm(v*) = y*``. RMSNorm, ``norm(v) = g ⊙ v / rms(v)``, has as
outputs only the ellipsoid ``rms(y / g) = 1`` — its outputs cannot grow, and where the gain
``g`` is small a coordinate can barely move. Gemma 3 270M's gains span 0.0–789 within one layer
(rms 14–36), so most ``y*`` are off the ellipsoid.

Rescaling ``y*/g`` onto it (the radial projection) is then far from the nearest reachable
output: on Gemma's CounterFact targets it missed ``R`` by 0.9–5× ``‖R‖`` per layer, worse than
leaving the layer alone, and the edits did not take. So ``v*`` is fitted:

    v* = argmin_v ‖norm(v) − y*‖²          (L-BFGS from v = current: never worse than no change)

``norm`` is invariant to the scale of its input, so every ``t·v*`` (t > 0) gives the same
output; the ``t`` nearest the current value is taken, so the weight update is the smallest.
"""

from __future__ import annotations

from typing import Callable

import torch

# L-BFGS iterations per fit: the rows are independent problems of d_model unknowns each, and
# the fit costs far less than one step of the target optimisation.
FIT_ITERATIONS = 100


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()


def value_through_norm(norm: Callable[[torch.Tensor], torch.Tensor], current: torch.Tensor,
                       wanted: torch.Tensor, *, iterations: int = FIT_ITERATIONS) -> torch.Tensor:
    """``v*`` (rows like ``current``) whose ``norm(v*)`` is nearest ``wanted``, on the ray
    through the optimum nearest ``current`` (see module doc)."""
    w = current.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=iterations, history_size=20,
                                  tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (norm(w) - wanted).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w = w.detach()
    if not torch.isfinite(w).all():  # the caller refuses non-finite values by name
        return w
    # argmin_t ‖t·w − current‖ = (w·current)/(w·w); a ray pointing away from `current` keeps its scale
    t = (w * current).sum(dim=-1, keepdim=True) / (w * w).sum(dim=-1, keepdim=True).clamp_min(1e-30)
    t = torch.where(t > 0, t, _rms(current) / _rms(w).clamp_min(1e-30))
    return t * w
