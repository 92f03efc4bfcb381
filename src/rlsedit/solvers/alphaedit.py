"""AlphaEdit's null-space projection and closed form, in our orientation.

Correspondence with jianghoucheng/AlphaEdit:

* ``experiments/evaluate.py`` (``get_project``): ``U, S, _ = svd(cov)`` of the key second
  moment ``E[kkᵀ]``, keep the singular vectors with ``S < nullspace_threshold`` and
  ``P = U_0 U_0ᵀ``. ``E[kkᵀ]`` is symmetric PSD, so its SVD is its eigendecomposition:
  :func:`null_space_projector` uses ``eigh``. Every released hparams file (gpt2-xl, GPT-J,
  Llama3-8B) and the ``alphaedit/config.py`` default use ``nullspace_threshold = 2e-2``, an
  *absolute* eigenvalue; it is kept as ``threshold`` for those files.

  An absolute threshold means nothing across models: the method assumes ``P K₀ ≈ 0`` for the
  corpus keys ``K₀`` (``K₀K₀ᵀ = n·E[kkᵀ]``), and on SmolLM2's E[kkᵀ] 2e-2 falls mid-spectrum
  (22–44 % of the key energy inside ``P``'s range). By default the null space is therefore
  chosen relative to the layer's spectrum: the most small eigenvectors whose eigenvalues sum
  to at most ``energy · tr(E)``. Then ``‖P K₀‖²_F / ‖K₀‖²_F = tr(P E P) / tr(E) ≤ energy``
  (:func:`null_space_energy`), which is the method's assumption made measurable.
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
"""Absolute eigenvalue threshold on ``E[kkᵀ]`` of AlphaEdit's released hparams."""

DEFAULT_NULLSPACE_ENERGY = 1e-2
"""Largest fraction of ``tr(E[kkᵀ])`` the null space may hold: ``‖P K₀‖²/‖K₀‖² ≤ 1 %``."""

DEFAULT_L2 = 10.0
"""``L2`` of AlphaEdit's released hparams."""


@torch.no_grad()
def null_space_projector(E: torch.Tensor, threshold: float | None = None, *,
                         energy: float = DEFAULT_NULLSPACE_ENERGY) -> torch.Tensor:
    """Projector onto the null space of ``E[kkᵀ]``: its eigenvectors of smallest eigenvalue.

    ``E = U diag(s) Uᵀ`` with ``s_1 ≤ … ≤ s_d``; ``U_0`` = the first ``m`` columns; ``P = U_0 U_0ᵀ``.
    With ``threshold`` (AlphaEdit's absolute rule) ``m`` counts the ``s_j < threshold``;
    without it ``m`` is the largest with ``Σ_{j≤m} max(s_j, 0) ≤ energy · Σ_j max(s_j, 0)``.

    Parameters
    ----------
    E : Tensor (d_k, d_k) — the key second moment ``E[kkᵀ]`` (not scaled by ``n``: a
        threshold is absolute), symmetric PSD.
    threshold : float >= 0 or None — absolute eigenvalue threshold (official hparams files).
    energy : float in [0, 1) — largest fraction of ``tr(E)`` in the null space, when
        ``threshold`` is None.

    Returns
    -------
    Tensor (d_k, d_k), symmetric and idempotent, in ``E``'s dtype (computed in float64).
    All zeros when no eigenvalue is below the threshold.
    """
    E = require_square("E", E)
    require_finite("E", E)
    require_symmetric("E", E)
    if threshold is not None:
        threshold = require_nonnegative("threshold", threshold)
    energy = require_nonnegative("energy", energy)
    if not energy < 1.0:
        raise InvalidRequestError(f"energy must be < 1 (a fraction of tr(E)), got {energy!r}")
    E64 = E.double()
    eigenvalues, U = torch.linalg.eigh(0.5 * (E64 + E64.mT))  # ascending
    if threshold is not None:
        # U_0 = eigenvectors with eigenvalue < threshold   (d_k, m)
        keep = eigenvalues < threshold
    else:
        # U_0 = the most small eigenvectors holding at most energy·tr(E)
        s = eigenvalues.clamp_min(0)
        keep = torch.cumsum(s, 0) <= energy * s.sum()
    U0 = U[:, keep]
    # P = U_0 U_0ᵀ
    return (U0 @ U0.mT).to(E.dtype)


@torch.no_grad()
def null_space_energy(E: torch.Tensor, P: torch.Tensor) -> float:
    """``tr(P E P) / tr(E)``: the share of the corpus keys' energy inside ``P``'s range.

    With ``K₀K₀ᵀ = n·E`` this is ``‖P K₀‖²_F / ‖K₀‖²_F`` — 0 when ``P`` is a true null space.
    """
    E = require_square("E", E).double()
    P = require_square("P", P, E.shape[0]).double()
    total = float(torch.diagonal(E).sum())
    if not total > 0:
        raise InvalidRequestError(f"tr(E) = {total!r}; the energy share needs a non-zero E")
    return float(torch.einsum("ij,jk,ki->", P, E, P)) / total


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
