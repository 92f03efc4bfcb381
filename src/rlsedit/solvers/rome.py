"""ROME's rank-one closed form, in our orientation.

Correspondence with kmeng01/rome:

* ``rome/compute_u.py``: ``u = C⁻¹ k̄ / ‖C⁻¹ k̄‖`` with ``C = E[kkᵀ]`` (``mom2`` moment,
  inverted with ``torch.inverse``) and ``k̄`` the subject's key averaged over context
  templates (``mom2_adjustment = true``) — :func:`rome_left_vector`.
* ``rome/compute_v.py``: ``right = (v* − h_out) / (k · u)`` where ``k`` and ``h_out = Wᵀk``
  are the module's input and output at the subject in the bare prompt.
* ``rome/rome_main.py``: ``upd = u rightᵀ`` (``d_k × d_v`` in GPT-2's Conv1D orientation,
  which is ours) — :func:`rome_delta`: ``ΔW = u (v* − Wᵀk)ᵀ / (uᵀk)``, so that
  ``(W + ΔW)ᵀ k = v*`` exactly. The scale of ``u`` (and of ``C``) cancels.

With ``k̄ = k`` this is the minimiser of ``tr(ΔWᵀ C ΔW)`` subject to ``(W + ΔW)ᵀ k = v*``.
ROME itself (and :class:`~rlsedit.editors.rome.ROME`) uses ``k̄`` averaged over its context
prefixes for ``u`` and the bare prompt's ``k`` for the constraint, so the bare prompt's output
becomes ``v*`` exactly whatever ``k̄`` is.
"""

from __future__ import annotations

import torch

from rlsedit.errors import NumericalError

from ._checks import require_finite, require_matrix, require_square


@torch.no_grad()
def rome_left_vector(C: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``u = C⁻¹ k / ‖C⁻¹ k‖`` for ``C (d_k, d_k)`` SPD (``E[kkᵀ]``) and a key ``k (d_k, 1)``.

    Returns a ``(d_k, 1)`` tensor; the solve uses a Cholesky factor of ``C``.
    """
    C = require_square("C", C)
    k = require_matrix("k", k, rows=C.shape[0], cols=1)
    require_finite("C", C)
    require_finite("k", k)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        raise NumericalError(f"C is not positive definite (leading minor {int(info)} of {C.shape[0]})")
    # u = C⁻¹ k, normalised as compute_u does
    u = torch.cholesky_solve(k, L)
    return u / torch.linalg.vector_norm(u)


@torch.no_grad()
def rome_delta(W: torch.Tensor, k: torch.Tensor, v_star: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """ROME's rank-one change ``ΔW = u (v* − Wᵀk)ᵀ / (uᵀk)``.

    Parameters
    ----------
    W : Tensor (d_k, d_v) — current weight.
    k : Tensor (d_k, 1) — the key whose output must become ``v*``.
    v_star : Tensor (1, d_v) — the target output (absolute, as ROME's ``target``).
    u : Tensor (d_k, 1) — left vector ``C⁻¹k̄`` (any scale), see :func:`rome_left_vector`.

    Returns
    -------
    Tensor (d_k, d_v) with ``(W + ΔW)ᵀ k = v*``. Refuses ``uᵀk`` that is zero or negligible
    against ``‖u‖‖k‖`` (the edit direction is orthogonal to the key).
    """
    W = require_matrix("W", W)
    d_k, d_v = W.shape
    k = require_matrix("k", k, rows=d_k, cols=1)
    u = require_matrix("u", u, rows=d_k, cols=1)
    v_star = require_matrix("v_star", v_star, rows=1, cols=d_v)
    for name, tensor in (("W", W), ("k", k), ("u", u), ("v_star", v_star)):
        require_finite(name, tensor)
    # uᵀk   [ROME's division factor]
    denominator = float((u.mT @ k).squeeze())
    scale = float(torch.linalg.vector_norm(u) * torch.linalg.vector_norm(k))
    if not abs(denominator) > 1e-12 * scale:
        raise NumericalError(f"u^T k = {denominator:.3g} is negligible against |u||k| = {scale:.3g}")
    # r = v* − Wᵀk   [residual at k]                   (1, d_v)
    residual = v_star - k.mT @ W
    # ΔW = u r / (uᵀk)                                  (d_k, d_v)
    return (u @ residual) / denominator
