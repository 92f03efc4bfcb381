"""What the public RLSEdit code computes per batch, for comparison with the exact recursion.

Source read: GitHub ``Euphoria040201/RLSEdit``, ``RLSEdit/RLSEdit_main.py``
(``apply_RLSEdit_to_model``, both stored revisions) and ``experiments/evaluate.py``.

Per call (one batch of requests) and per edited layer ``i`` of ``L`` layers, that code does::

    C_prev = C_0 = robust_inverse(λ² I + μ² · mom2_update_weight · E[kkᵀ])
    F_t    = C_prev K_t;   S_t = I + K_tᵀ F_t;   G_t = F_t chol(S_t)⁻¹
    C_t    = C_prev − G_t G_tᵀ
    resid  = (V_t − K_tᵀ W_prev) / (L − i)            with V_t = z − h(z_layer)
    W_t    = W_prev + C_t K_t resid

where ``W_prev`` is the layer's current (already edited) weight. Two things make it differ
from the exact recursion of :class:`~rlsedit.solvers.rls.RLSState`:

1. **C is reset to C_0 for every batch.** ``apply_RLSEdit_to_model`` rebuilds ``C`` from the
   covariance whenever its ``cache_c`` argument is None, and ``experiments/evaluate.py``
   passes ``cache_c`` only for AlphaEdit, EvoEdit, MEMIT_seq and NSE — not for RLSEdit — so
   the returned ``C`` is dropped and there is no recursion across batches.
2. **The residual is subtracted twice.** ``V_t`` there is ``z − h``, the residual of the
   hidden state at the last edited layer (a *delta*, as in MEMIT), yet it is used as if it
   were the absolute target: ``V_t − K_tᵀ W_prev`` subtracts the layer's whole current
   output from a residual. The exact update with absolute target ``K_tᵀ W_prev + R`` has the
   innovation ``R`` alone.
   The division by the number of layers left (MEMIT's residual spreading) is applied after
   that subtraction, to the whole difference.

Other details: ``robust_inverse`` tries a Cholesky inverse of the symmetrised matrix, adds a
diagonal jitter ``1e-6 · max(1, mean |diag|)`` growing ×10 for up to 5 tries, then falls back
to ``pinv``; the covariance is the ``mom2`` second moment ``E[kkᵀ]`` times
``mom2_update_weight`` (15000 in its Llama3-8B hparams, with ``lambda_reg = 0``,
``mu_reg = 1``). In our terms ``C_0`` is ``RLSState.from_anchor(W0, A, lam, mu).C_`` with
``A = mom2_update_weight · E[kkᵀ]``.
"""

from __future__ import annotations

import torch

from rlsedit.errors import InvalidRequestError, NumericalError

from ._checks import require_finite, require_matrix, require_square


@torch.no_grad()
def official_update(
    C0: torch.Tensor,
    W: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    *,
    layers_left: int = 1,
) -> torch.Tensor:
    """One batch of the public RLSEdit code: ``W_new = W + C_t K (R − KᵀW) / layers_left``.

    ``C_t = C_0 − F S⁻¹ Fᵀ`` with ``F = C_0 K``, ``S = I + KᵀF`` — always from ``C_0``, never
    from the previous batch's ``C`` (module docstring, point 1) — and ``R`` is the residual
    ``z − h`` the official code calls ``V_t`` (point 2).

    Parameters
    ----------
    C0 : Tensor (d_k, d_k) — ``(λ²I + μ²A)⁻¹``.
    W : Tensor (d_k, d_v) — the current (already edited) weight, our orientation.
    K : Tensor (d_k, u) — keys.
    R : Tensor (u, d_v) — residual ``z − h`` (not divided by the layers left).
    layers_left : int >= 1 — ``len(layers) − i`` in the official loop.

    Returns
    -------
    Tensor (d_k, d_v): the new weight (inputs are not modified). Computed in the inputs'
    dtype, like the official code (float32 there).
    """
    W = require_matrix("W", W)
    d_k, d_v = W.shape
    C0 = require_square("C0", C0, d_k)
    K = require_matrix("K", K, rows=d_k)
    R = require_matrix("R", R, rows=K.shape[1], cols=d_v)
    if isinstance(layers_left, bool) or not isinstance(layers_left, int) or layers_left < 1:
        raise InvalidRequestError(f"layers_left must be an int >= 1, got {layers_left!r}")
    for name, tensor in (("C0", C0), ("W", W), ("K", K), ("R", R)):
        require_finite(name, tensor)
    # F_t = C_0 K_t                                   (d_k, u)
    F = C0 @ K
    # S_t = I + K_tᵀ F_t = Uᵀ U   (upper Cholesky, as the official code)   (u, u)
    S = K.mT @ F
    S.diagonal().add_(1.0)
    U, info = torch.linalg.cholesky_ex(S, upper=True)
    if int(info) != 0:
        raise NumericalError(f"S = I + K^T C0 K is not positive definite (leading minor {int(info)})")
    # G_t = F_t U⁻¹,  C_t = C_0 − G_t G_tᵀ   [C_0 each batch: no recursion]
    G = torch.linalg.solve_triangular(U, F, upper=True, left=False)
    C_t = C0 - G @ G.mT
    # resid = (R − K_tᵀ W_prev) / layers_left   [residual minus the current output]
    resid = (R - K.mT @ W) / layers_left
    # W_t = W_prev + C_t K_t resid
    return W + C_t @ K @ resid
