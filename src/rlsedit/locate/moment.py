"""The corpus second moment ``E[k kᵀ]`` of one layer's keys, and a summary of its spectrum."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SecondMoment:
    """``mom = E[k kᵀ] (d_k, d_k)`` float64 (uncentered) over ``count`` tokens."""

    mom: torch.Tensor
    count: int

    @property
    def d_k(self) -> int:
        return int(self.mom.shape[0])

    def gram(self) -> torch.Tensor:
        """The anchor Gram ``A = K_0 K_0ᵀ = count · E[k kᵀ]`` (float64)."""
        return self.mom * self.count


def spectrum_summary(moment: SecondMoment) -> dict:
    """Trace, numerical rank and condition number of ``E[k kᵀ]`` (eigenvalues in float64).

    Rank counts eigenvalues above ``d_k · eps64 · λ_max`` (NumPy's ``matrix_rank`` rule);
    the condition number is ``λ_max / λ_min`` and infinite when ``λ_min ≤ 0``.
    """
    eig = torch.linalg.eigvalsh(moment.mom.to(torch.float64))
    top = float(eig[-1])
    tol = moment.d_k * torch.finfo(torch.float64).eps * max(top, 0.0)
    low = float(eig[0])
    return {
        "count": moment.count,
        "trace": float(moment.mom.diagonal().sum()),
        "rank": int((eig > tol).sum()),
        "eig_max": top,
        "eig_min": low,
        "condition": top / low if low > 0 else math.inf,
    }
