"""MEMIT's closed form and its sequential variant (MEMIT-seq), in our orientation.

Correspondence with the public code (``W`` here is ``weight.T`` for ``nn.Linear``):

* kmeng01/memit, ``memit/memit_main.py`` (``execute_memit``), per layer ``i`` of ``L``::

      adj_k = solve(mom2_update_weight · cov + K Kᵀ, K)          # float64
      resid = (z − h) / (L − i)
      upd   = resid @ adj_kᵀ   (d_v, d_k)   →   ΔW = adj_k residᵀ  (d_k, d_v)

  i.e. ``ΔW = (λ_mom E[kkᵀ] + K Kᵀ)⁻¹ K R`` with ``R = residᵀ (u, d_v)``: :func:`memit_delta`
  with ``mu**2 * A = mom2_update_weight * E[kkᵀ]``.

* jianghoucheng/AlphaEdit, ``memit/memit_seq_main.py`` (``MEMIT_seq``): the same solve with
  the Gram of every earlier batch added, ``cache_c[i] += K Kᵀ`` after each batch::

      adj_k = solve(mom2_update_weight · cov + cache_c[i] + K Kᵀ, K)

  As the residual ``R`` is measured at the current (already edited) weight, the absolute
  target is ``V = KᵀW_prev + R`` and ``ΔW = (μ²A + G_past + KKᵀ)⁻¹ K (V − KᵀW_prev)``:
  :func:`memit_seq_solve`. This is the RLS recursion with ``λ = 0`` written as a fresh
  ``d_k × d_k`` solve per batch (``O(d_k³)`` instead of ``O(d_k² u)``): with
  ``C_t = (μ²A + Σ_{i≤t} K_iK_iᵀ)⁻¹`` both give ``W_t = W_{t−1} + C_t K_t (V_t − K_tᵀW_{t−1})``.
  (That file's ``apply_memit_seq_to_model`` calls ``execute_memit`` without forwarding
  ``cache_c``; the formula above is what ``execute_memit`` computes when it is given.)

Both functions solve the SPD system with a Cholesky factor, in the inputs' dtype (the
public code uses an LU ``torch.linalg.solve`` in float64; pass float64 tensors for that).
"""

from __future__ import annotations

import torch

from rlsedit.errors import NumericalError

from ._checks import require_finite, require_matrix, require_nonnegative, require_square


@torch.no_grad()
def memit_delta(A: torch.Tensor, K: torch.Tensor, R: torch.Tensor, *, mu: float = 1.0) -> torch.Tensor:
    """MEMIT's weight change ``ΔW = (μ²A + K Kᵀ)⁻¹ K R``.

    Parameters
    ----------
    A : Tensor (d_k, d_k) — key second moment (``E[kkᵀ]``, or ``n·E[kkᵀ]``), symmetric PSD.
    K : Tensor (d_k, u) — keys of this batch.
    R : Tensor (u, d_v) — residuals (already divided by the number of layers left).
    mu : float — ``μ² = mom2_update_weight`` when ``A = E[kkᵀ]``.

    Returns
    -------
    Tensor (d_k, d_v).
    """
    A = require_square("A", A)
    K = require_matrix("K", K, rows=A.shape[0])
    R = require_matrix("R", R, rows=K.shape[1])
    mu = require_nonnegative("mu", mu)
    for name, tensor in (("A", A), ("K", K), ("R", R)):
        require_finite(name, tensor)
    # M = μ²A + K Kᵀ                         (d_k, d_k)
    M = torch.addmm(A, K, K.mT, beta=mu * mu)
    # ΔW = M⁻¹ (K R)                          (d_k, d_v)
    return _cholesky_solve(M, K @ R, "mu^2 A + K K^T")


@torch.no_grad()
def memit_seq_solve(
    W_prev: torch.Tensor,
    A: torch.Tensor,
    G_past: torch.Tensor | None,
    K: torch.Tensor,
    V: torch.Tensor,
    *,
    mu: float = 1.0,
) -> torch.Tensor:
    """MEMIT-seq's new weight ``W_prev + (μ²A + G_past + KKᵀ)⁻¹ K (V − KᵀW_prev)``.

    Parameters
    ----------
    W_prev : Tensor (d_k, d_v) — weight before this batch.
    A : Tensor (d_k, d_k) — key second moment, as in :func:`memit_delta`.
    G_past : Tensor (d_k, d_k) or None — ``Σ K_i K_iᵀ`` over earlier batches (None: none).
        The caller adds ``K Kᵀ`` to it after the batch.
    K : Tensor (d_k, u), V : Tensor (u, d_v) — keys and absolute targets.
    mu : float — weight of ``A``, as in :func:`memit_delta`.

    Returns
    -------
    Tensor (d_k, d_v): the new weight (inputs are not modified). One ``d_k × d_k`` Cholesky
    per call: ``≈ d_k³/3`` flops.
    """
    W_prev = require_matrix("W_prev", W_prev)
    d_k, d_v = W_prev.shape
    A = require_square("A", A, d_k)
    K = require_matrix("K", K, rows=d_k)
    V = require_matrix("V", V, rows=K.shape[1], cols=d_v)
    mu = require_nonnegative("mu", mu)
    tensors = [("W_prev", W_prev), ("A", A), ("K", K), ("V", V)]
    if G_past is not None:
        tensors.append(("G_past", require_square("G_past", G_past, d_k)))
    for name, tensor in tensors:
        require_finite(name, tensor)
    # M = μ²A + G_past + K Kᵀ                 (d_k, d_k)
    M = torch.addmm(A, K, K.mT, beta=mu * mu)
    if G_past is not None:
        M.add_(G_past)
    # E = V − Kᵀ W_prev   [residual at the current weight]   (u, d_v)
    E = V - K.mT @ W_prev
    # W_new = W_prev + M⁻¹ K E
    return W_prev + _cholesky_solve(M, K @ E, "mu^2 A + G_past + K K^T")


def _cholesky_solve(M: torch.Tensor, B: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise NumericalError(f"{what} is not positive definite (leading minor {int(info)} of {M.shape[0]})")
    return torch.cholesky_solve(B, L)
