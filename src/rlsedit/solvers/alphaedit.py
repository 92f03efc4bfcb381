"""AlphaEdit's null-space projection and closed form, in our orientation.

Correspondence with jianghoucheng/AlphaEdit:

* ``experiments/evaluate.py`` (``get_project``): ``U, S, _ = svd(cov)`` of the key second
  moment ``E[kkᵀ]``, keep the singular vectors with ``S < nullspace_threshold`` and
  ``P = U_0 U_0ᵀ``. ``E[kkᵀ]`` is symmetric PSD, so its SVD is its eigendecomposition:
  :func:`null_space_projector` uses ``eigh``. Every released hparams file (gpt2-xl, GPT-J,
  Llama3-8B) and the ``alphaedit/config.py`` default use ``nullspace_threshold = 2e-2``.
* ``AlphaEdit/AlphaEdit_main.py``::

      upd = solve(P (K Kᵀ + cache_c) + L2 · I, P K residᵀ)       (d_k, d_v)

  with ``resid = (z − h)/(L − i)`` (``d_v × u``) and ``cache_c = Σ_past K Kᵀ`` accumulated
  after each batch, ``L2 = 10`` in every released hparams file. :func:`alphaedit_delta` is
  this solve with ``R = residᵀ (u, d_v)``. Transposed, it is the paper's
  ``Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + αI)⁻¹``. For ``l2 > 0`` the solution lies in the range
  of ``P``: ``l2·ΔW = P (K R − (G_past + KKᵀ) ΔW)``.
"""

from __future__ import annotations

import torch

from rlsedit.errors import InvalidRequestError

from ._checks import require_finite, require_matrix, require_nonnegative, require_square, require_symmetric

DEFAULT_NULLSPACE_THRESHOLD = 2e-2
"""Eigenvalue threshold on ``E[kkᵀ]`` of AlphaEdit's released hparams."""

DEFAULT_L2 = 10.0
"""``L2`` of AlphaEdit's released hparams."""


@torch.no_grad()
def null_space_projector(E: torch.Tensor, threshold: float = DEFAULT_NULLSPACE_THRESHOLD) -> torch.Tensor:
    """Projector onto the eigenvectors of ``E[kkᵀ]`` whose eigenvalue is below ``threshold``.

    ``E = U diag(s) Uᵀ``; ``U_0`` = columns with ``s < threshold``; ``P = U_0 U_0ᵀ``.

    Parameters
    ----------
    E : Tensor (d_k, d_k) — the key second moment ``E[kkᵀ]`` (not scaled by ``n``: the
        threshold is absolute), symmetric PSD.
    threshold : float >= 0.

    Returns
    -------
    Tensor (d_k, d_k), symmetric and idempotent, in ``E``'s dtype (computed in float64).
    All zeros when no eigenvalue is below the threshold.
    """
    E = require_square("E", E)
    require_finite("E", E)
    require_symmetric("E", E)
    threshold = require_nonnegative("threshold", threshold)
    E64 = E.double()
    eigenvalues, U = torch.linalg.eigh(0.5 * (E64 + E64.mT))
    # U_0 = eigenvectors with eigenvalue < threshold   (d_k, m)
    U0 = U[:, eigenvalues < threshold]
    # P = U_0 U_0ᵀ
    return (U0 @ U0.mT).to(E.dtype)


@torch.no_grad()
def alphaedit_delta(
    P: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    G_past: torch.Tensor | None = None,
    l2: float = DEFAULT_L2,
) -> torch.Tensor:
    """AlphaEdit's weight change ``ΔW = (P (G_past + K Kᵀ) + l2·I)⁻¹ P K R``.

    Parameters
    ----------
    P : Tensor (d_k, d_k) — null-space projector (:func:`null_space_projector`).
    K : Tensor (d_k, u) — keys of this batch.
    R : Tensor (u, d_v) — residuals (already divided by the number of layers left).
    G_past : Tensor (d_k, d_k) or None — ``Σ K_i K_iᵀ`` of earlier batches (``cache_c``).
    l2 : float > 0 — AlphaEdit's ``L2``.

    Returns
    -------
    Tensor (d_k, d_v). The system is not symmetric, so it is solved by LU (as upstream).
    """
    P = require_square("P", P)
    d_k = P.shape[0]
    K = require_matrix("K", K, rows=d_k)
    R = require_matrix("R", R, rows=K.shape[1])
    l2 = require_nonnegative("l2", l2)
    if l2 == 0.0:
        raise InvalidRequestError("l2 must be > 0: P (G + K K^T) is singular on the range of I - P")
    tensors = [("P", P), ("K", K), ("R", R)]
    if G_past is not None:
        tensors.append(("G_past", require_square("G_past", G_past, d_k)))
    for name, tensor in tensors:
        require_finite(name, tensor)
    # G = G_past + K Kᵀ                       (d_k, d_k)
    G = K @ K.mT
    if G_past is not None:
        G.add_(G_past)
    # M = P G + l2·I                           (d_k, d_k)
    M = P @ G
    M.diagonal().add_(l2)
    # ΔW = M⁻¹ P K R                           (d_k, d_v)
    return torch.linalg.solve(M, P @ (K @ R))
