"""The one-shot (batch) solution of the RLSEdit objective: the float64 reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlsedit.errors import InvalidRequestError, NumericalError

from ._checks import require_batch, require_finite, require_matrix, require_nonnegative, require_square


@torch.no_grad()
def solve_oneshot(
    W0: torch.Tensor,
    A: torch.Tensor | None,
    lam: float,
    mu: float,
    Ks: Sequence[torch.Tensor],
    Vs: Sequence[torch.Tensor],
    *,
    jitter: float = 0.0,
) -> torch.Tensor:
    r"""Minimise the whole stream's objective at once, in float64.

    ::

        W* = argmin_W  Σ_i ‖K_iᵀW − V_i‖²_F + (λ² + jitter)‖W − W_0‖²_F + μ²‖K_0ᵀW − K_0ᵀW_0‖²_F

    by its normal equations ``M W* = B``, solved with a Cholesky factor of ``M``::

        M = (λ² + jitter) I + μ²A + Σ_i K_i K_iᵀ          (d_k, d_k)
        B = ((λ² + jitter) I + μ²A) W_0 + Σ_i K_i V_i      (d_k, d_v)

    Parameters
    ----------
    W0 : Tensor (d_k, d_v)
    A : Tensor (d_k, d_k) or None — anchor Gram ``K_0K_0ᵀ``.
    lam, mu : float >= 0
    Ks, Vs : sequences of ``K_i (d_k, u_i)`` and ``V_i (u_i, d_v)``, same length.
    jitter : float >= 0 — the ridge :class:`~rlsedit.solvers.rls.RLSState` added to ``λ²``
        (its ``jitter`` attribute), so both minimise the same objective.

    Returns
    -------
    Tensor (d_k, d_v), float64, on ``W0``'s device. This is the reference
    :class:`~rlsedit.solvers.rls.RLSState` is tested against; it costs ``O(d_k³)``.
    """
    W0 = require_matrix("W0", W0)
    d_k, d_v = W0.shape
    lam = require_nonnegative("lam", lam)
    mu = require_nonnegative("mu", mu)
    jitter = require_nonnegative("jitter", jitter)
    if len(Ks) != len(Vs):
        raise InvalidRequestError(f"Ks and Vs must have the same length, got {len(Ks)} and {len(Vs)}")
    device = W0.device
    f64 = dict(dtype=torch.float64, device=device)
    W0 = W0.to(**f64)
    require_finite("W0", W0)
    # P = (λ² + jitter) I + μ²A   [the prior's precision]     (d_k, d_k)
    prior = torch.zeros((d_k, d_k), **f64)
    if A is not None:
        A = require_square("A", A, d_k).to(**f64)
        require_finite("A", A)
        prior.add_(A + A.mT, alpha=0.5 * mu * mu)
    prior.diagonal().add_(lam * lam + jitter)
    # B = P W_0 + Σ K_i V_i                                     (d_k, d_v)
    B = prior @ W0
    # M = P + Σ K_i K_iᵀ                                        (d_k, d_k)
    M = prior
    for index, (K, V) in enumerate(zip(Ks, Vs)):
        K, V = require_batch(K, V, d_k, d_v)
        K, V = K.to(**f64), V.to(**f64)
        require_finite(f"Ks[{index}]", K)
        require_finite(f"Vs[{index}]", V)
        M.addmm_(K, K.mT)
        B.addmm_(K, V)
    # W* = M⁻¹ B   [Cholesky solve]
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise NumericalError(
            f"the normal matrix (lam^2 + jitter) I + mu^2 A + sum K K^T is not positive definite "
            f"(leading minor {int(info)} of {d_k}); use lam > 0 or jitter > 0"
        )
    return torch.cholesky_solve(B, L)
