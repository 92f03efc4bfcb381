"""Exact recursive least squares for one edited layer: the RLSEdit solver.

Notation (our orientation, ``docs/DESIGN.md``): ``W (d_k, d_v)`` maps keys to values by
``v = Wᵀk``; a batch is ``K (d_k, u)`` (keys as columns) with absolute targets ``V (u, d_v)``;
``A = K_0K_0ᵀ (d_k, d_k)`` is the anchor Gram, already scaled by the number of anchor keys.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping

import torch

from rlsedit.errors import InvalidRequestError, NumericalError

from ._checks import (
    FLOAT_DTYPES,
    require_batch,
    require_finite,
    require_matrix,
    require_nonnegative,
    require_square,
    require_symmetric,
)

log = logging.getLogger(__name__)

RELATIVE_JITTER = 1e-6
"""δ of the singular-anchor rule: the automatic jitter is ``δ · tr(λ²I + μ²A) / d_k``."""

DEFAULT_SYMMETRIZE_EVERY = 64
"""Updates between two re-symmetrisations ``C ← (C + Cᵀ)/2`` (see :class:`RLSState`)."""

SYMMETRIZE_TILE = 128
"""Tile side of the CPU re-symmetrisation (the fastest of 128…768 at d_k = 1536 and 2048)."""

DOWNDATE_WARN_PIVOT = 1e-6
"""A downdate whose ``S = I − KᵀCK`` has a Cholesky pivot below this logs a warning."""

STATE_FORMAT_VERSION = 1

_TENSOR_KEYS = ("C", "W", "W0")
_SCALAR_KEYS = ("lam", "mu", "jitter", "n_keys", "n_updates", "symmetrize_every", "format_version")


class RLSState:
    r"""The exact regularised least-squares solution of an edit stream, kept up to date.

    Objective, over all batches ``i ≤ t`` seen so far::

        W*_t = argmin_W  Σ_{i≤t} ‖K_iᵀW − V_i‖²_F + λ²‖W − W_0‖²_F + μ²‖K_0ᵀW − K_0ᵀW_0‖²_F

    Its normal equations are ``C_t⁻¹ W*_t = (λ²I + μ²A) W_0 + Σ_i K_i V_i`` with the inverse
    Gram ``C_t = (λ²I + μ²A + Σ_{i≤t} K_iK_iᵀ)⁻¹``. Each batch costs ``O(d_k² u)``, whatever
    the length of the history, and the result equals the one-shot solution
    (:func:`rlsedit.solvers.oneshot.solve_oneshot`) up to rounding.

    Update with a batch ``(K_t, V_t)`` (Woodbury identity, ``u × u`` Cholesky)::

        F   = C_{t−1} K_t                              (d_k, u)
        S   = I_u + K_tᵀ F = L Lᵀ                      (u, u)
        H   = F L⁻ᵀ            so  H Hᵀ = F S⁻¹ Fᵀ      (d_k, u)
        C_t = C_{t−1} − H Hᵀ                           (d_k, d_k)
        W_t = W_{t−1} + C_t K_t (V_t − K_tᵀ W_{t−1}),  with C_t K_t = F S⁻¹ = H L⁻¹

    Downdate (exact removal of a batch, or of some of its columns, added earlier)::

        F   = C K;   S = I_u − Kᵀ F = L Lᵀ   (PD whenever (K, V) is part of the state)
        C₊  = (C⁻¹ − K Kᵀ)⁻¹ = C + H Hᵀ,   H = F L⁻ᵀ
        W₊  = W + C₊ K (Kᵀ W − V),         C₊ K = F S⁻¹ = H L⁻¹

    which follows from ``C₊⁻¹W₊ = C⁻¹W − KV`` (the normal equations without the batch).
    Downdating is less stable than updating: the eigenvalues of ``S`` lie in ``(0, 1]``, and
    a small one (the removed keys were nearly the only information in some direction, e.g.
    a direction the anchor misses, regularised only by a tiny ``λ²`` or jitter) amplifies
    rounding by about ``1/λ_min(S)``; such calls log a warning.

    Attributes
    ----------
    C_ : Tensor (d_k, d_k)
        Inverse Gram ``C_t``, symmetric positive definite, in the state dtype.
    W_ : Tensor (d_k, d_v)
        Current solution ``W*_t``.
    W0 : Tensor (d_k, d_v)
        The unedited weight ``W_0`` the objective anchors to.
    lam, mu : float
        ``λ`` and ``μ`` of the objective.
    jitter : float
        Extra ridge actually used: the objective's ``λ²`` is ``lam**2 + jitter`` (0 unless
        the anchor was singular, see below). Pass it to ``solve_oneshot(..., jitter=...)``
        to reproduce the same objective.
    n_keys_ : int
        Number of key columns currently in the state (updates add, downdates remove).
    n_updates_ : int
        Number of successful ``update``/``downdate`` calls.
    symmetrize_every : int
        ``C`` is re-symmetrised after every ``symmetrize_every``-th call (0: never).

    Numerical notes
    ---------------
    * The ``u × u`` system ``S`` is factored in float64 whatever the state dtype; the
      ``d_k²`` work (``F = CK`` and the in-place ``C −= HHᵀ``) runs in the state dtype.
    * Rounding can make ``C`` drift from symmetry; :meth:`symmetrize` (``C ← (C + Cᵀ)/2``)
      costs a full extra pass over ``C`` with transposed reads — more than an update with
      ``u = 1`` — so it runs after every ``symmetrize_every``-th call only. With MKL on CPU,
      ``HHᵀ`` comes out bitwise symmetric and the drift is zero; :meth:`symmetry_error`
      reports it.
    * A call is refused with :class:`~rlsedit.errors.NumericalError` — leaving ``C_``, ``W_``
      and the counters bitwise unchanged — if ``K`` or ``V`` holds NaN/inf, if ``S`` is not
      positive definite, if an update's ``S`` has ``λ_max(S)`` over ``1/eps`` of the state
      dtype (:func:`_refuse_ill_conditioned`), if the new ``C`` would get a non-positive
      diagonal, or if a new entry of ``C`` or ``W`` could overflow. The last two are decided
      from ``O(d_k u)`` bounds, not from passes over the results; all checks are read back in
      one host synchronisation per call (see ``_verify``), the eigenvalues of ``S`` only when
      ``tr(S) ≥ λ_max(S)`` exceeds that limit.
    * Singular anchor rule (``from_anchor`` with ``jitter=None``): ``M = λ²I + μ²A`` is
      factored in float64. If the factorisation fails, or its smallest pivot is below
      ``δ · tr(M)/d_k`` (``δ =`` :data:`RELATIVE_JITTER`), ``jitter = δ · tr(M)/d_k`` is added to
      ``λ²`` (a warning is logged and the value kept in :attr:`jitter`). This happens only when
      ``λ²`` is negligible and ``A`` is rank-deficient or nearly so (e.g. ``λ = 0`` with fewer
      anchor keys than ``d_k``); a full-rank anchor or any ``λ² ≥ δ·tr(M)/d_k`` is used as
      given. ``λ = 0`` with no anchor (``A is None``, ``μ = 0`` or ``A = 0``) is refused:
      there is no scale to regularise with, pass ``jitter`` explicitly.

    References
    ----------
    * RLSEdit, arXiv:2601.15686 — the objective and the recursion above (its Sec. 4.4, as
      transcribed in the docstring of ``RLSEdit/RLSEdit_main.py`` of Euphoria040201/RLSEdit).
    * S. Haykin, *Adaptive Filter Theory*, ch. "Recursive least-squares adaptive filters"
      (RLS with a matrix inversion lemma gain; block form here).
    * G. H. Golub, C. F. Van Loan, *Matrix Computations*, Sec. 2.1.4 (Sherman–Morrison–
      Woodbury) and Sec. 4.2 (Cholesky).
    """

    def __init__(
        self,
        C: torch.Tensor,
        W: torch.Tensor,
        W0: torch.Tensor,
        *,
        lam: float,
        mu: float,
        jitter: float,
        n_keys: int = 0,
        n_updates: int = 0,
        symmetrize_every: int = DEFAULT_SYMMETRIZE_EVERY,
    ) -> None:
        """Wrap existing tensors (no copy). Use :meth:`from_anchor` or :meth:`from_state_dict`."""
        W = require_matrix("W", W)
        d_k, d_v = W.shape
        C = require_square("C", C, d_k)
        W0 = require_matrix("W0", W0, rows=d_k, cols=d_v)
        if C.dtype not in FLOAT_DTYPES:
            raise InvalidRequestError(f"the state dtype must be float32 or float64, got {C.dtype}")
        for name, tensor in (("W", W), ("W0", W0)):
            if tensor.dtype != C.dtype or tensor.device != C.device:
                raise InvalidRequestError(
                    f"{name} must share C's dtype and device ({C.dtype}, {C.device}), "
                    f"got ({tensor.dtype}, {tensor.device})"
                )
        for name, count in (("n_keys", n_keys), ("n_updates", n_updates), ("symmetrize_every", symmetrize_every)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise InvalidRequestError(f"{name} must be an int >= 0, got {count!r}")
        self.C_ = C
        self.W_ = W
        self.W0 = W0
        self.lam = require_nonnegative("lam", lam)
        self.mu = require_nonnegative("mu", mu)
        self.jitter = require_nonnegative("jitter", jitter)
        self.n_keys_ = n_keys
        self.n_updates_ = n_updates
        self.symmetrize_every = symmetrize_every
        self._last_S: torch.Tensor | None = None  # (u, u) float64, for last_s_condition()
        # an upper bound on max |W|, kept up to date by _apply (overflow guard)
        self._w_abs_bound = float(W.abs().max()) if W.numel() else 0.0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_anchor(
        cls,
        W0: torch.Tensor,
        A: torch.Tensor | None,
        lam: float,
        mu: float,
        *,
        dtype: torch.dtype = torch.float32,
        jitter: float | None = None,
        symmetrize_every: int = DEFAULT_SYMMETRIZE_EVERY,
    ) -> RLSState:
        """Start a stream at ``W = W0`` with ``C_0 = ((λ² + jitter) I + μ²A)⁻¹``.

        Parameters
        ----------
        W0 : Tensor (d_k, d_v)
            Unedited weight in our orientation; its device is the state's device.
        A : Tensor (d_k, d_k) or None
            Anchor Gram ``K_0K_0ᵀ = n·E[kkᵀ]`` (symmetric PSD); None for no anchor term.
        lam, mu : float >= 0
            ``λ`` and ``μ`` of the objective.
        dtype : torch.float32 or torch.float64
            Dtype of ``C_``, ``W_``, ``W0`` and of the update arithmetic.
        jitter : float >= 0 or None
            Ridge added to ``λ²``; None applies the singular-anchor rule (class docstring).
        symmetrize_every : int >= 0
            Calls between two re-symmetrisations of ``C`` (0: never).

        ``C_0`` is computed in float64 (Cholesky factor, then ``cholesky_inverse``) and cast.
        """
        W0 = require_matrix("W0", W0)
        require_finite("W0", W0)
        d_k, _ = W0.shape
        lam = require_nonnegative("lam", lam)
        mu = require_nonnegative("mu", mu)
        if dtype not in FLOAT_DTYPES:
            raise InvalidRequestError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        device = W0.device
        # M = λ²I + μ²A   (d_k, d_k), float64
        M = torch.zeros((d_k, d_k), dtype=torch.float64, device=device)
        if A is not None:
            A = require_square("A", A, d_k)
            require_finite("A", A)
            require_symmetric("A", A)
            A64 = A.to(device=device, dtype=torch.float64)
            # (A + Aᵀ)/2 removes the rounding asymmetry of an accumulated Gram
            M.add_(A64 + A64.mT, alpha=0.5 * mu * mu)
        M.diagonal().add_(lam * lam)
        L, jitter = _factor_anchor(M, jitter)
        # C_0 = M⁻¹ = L⁻ᵀ L⁻¹   [Cholesky inverse, float64]
        C0 = torch.cholesky_inverse(L)
        C0 = 0.5 * (C0 + C0.mT)
        # row-major, as C is when read back from a state file: cholesky_inverse returns it
        # column-major, and the GEMMs of an update round differently on the two layouts, so a
        # reloaded stream would drift from the live one by float rounding
        C = C0.to(dtype).contiguous()
        require_finite("C_0 (after the cast to the state dtype)", C)
        # W0 is never written (it is kept for the state file and diagnostics), so in the state
        # dtype it is held as given, not copied: the editor holding W0 shares its memory
        W0 = W0.to(dtype=dtype)
        return cls(
            C,
            W0.clone(),
            W0,
            lam=lam,
            mu=mu,
            jitter=jitter,
            symmetrize_every=symmetrize_every,
        )

    def __deepcopy__(self, memo: dict) -> RLSState:
        """A copy whose ``C_`` and ``W_`` are new tensors and whose ``W0`` is shared: ``W0`` is
        never written, so copying it (one d_k × d_v matrix per copy) would only cost memory."""
        twin = copy.copy(self)
        twin.C_ = self.C_.clone()
        twin.W_ = self.W_.clone()
        twin._last_S = None if self._last_S is None else self._last_S.clone()
        memo[id(self)] = twin
        return twin

    # ------------------------------------------------------------------ properties
    @property
    def d_k(self) -> int:
        return self.C_.shape[0]

    @property
    def d_v(self) -> int:
        return self.W_.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.C_.dtype

    @property
    def device(self) -> torch.device:
        return self.C_.device

    def __repr__(self) -> str:
        return (
            f"RLSState(d_k={self.d_k}, d_v={self.d_v}, lam={self.lam:g}, mu={self.mu:g}, "
            f"jitter={self.jitter:g}, n_keys_={self.n_keys_}, dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ recursion
    @torch.no_grad()
    def update(self, K: torch.Tensor, V: torch.Tensor) -> RLSState:
        """Add a batch: ``K (d_k, u)`` keys as columns, ``V (u, d_v)`` absolute targets.

        Afterwards ``W_`` is the exact minimiser of the objective over all batches so far.
        Cost ``≈ 4 d_k² u`` flops (two ``d_k × d_k × u`` products) plus ``O(d_k u (u + d_v))``.
        Returns ``self``. Refused calls raise and change nothing (class docstring).
        """
        return self._apply(K, V, sign=1)

    @torch.no_grad()
    def downdate(self, K: torch.Tensor, V: torch.Tensor) -> RLSState:
        """Remove a batch added earlier (or some of its columns with their target rows).

        Afterwards ``W_`` is the exact minimiser of the objective without ``(K, V)``. The
        state cannot check that ``(K, V)`` was really added: it only refuses a removal that
        would make ``C`` indefinite (``S = I − KᵀCK`` not PD) or remove more keys than it
        holds. Same cost as :meth:`update`. Returns ``self``; refused calls raise and change
        nothing.
        """
        return self._apply(K, V, sign=-1)

    def _apply(self, K: object, V: object, *, sign: int) -> RLSState:
        """Update (``s = +1``) or downdate (``s = −1``); every check precedes every write.

        With ``s = ±1`` both are one recursion::

            F = C K;  S = I + s KᵀF = L Lᵀ;  H = F L⁻ᵀ;  Y = L⁻¹ s (V − KᵀW)
            C ← C − s H Hᵀ;  W ← W + H Y
        """
        op = "update" if sign > 0 else "downdate"
        K, V = self._prepare(K, V)
        u = K.shape[1]
        if sign < 0 and u > self.n_keys_:
            raise InvalidRequestError(
                f"downdate of {u} keys, but the state holds only {self.n_keys_}; nothing was applied"
            )
        C, W = self.C_, self.W_
        # F = C K                                             (d_k, u)
        F = C @ K
        # S = I_u + s Kᵀ F = L Lᵀ   [factored in float64; its status is checked below]   (u, u)
        S = (K.mT @ F).double().mul_(sign)
        S.diagonal().add_(1.0)
        L, info = torch.linalg.cholesky_ex(S)
        # H = F L⁻ᵀ, so that H Hᵀ = F S⁻¹ Fᵀ                  (d_k, u)
        H = torch.linalg.solve_triangular(L.mT, F.double(), upper=True, left=False).to(C.dtype)
        # E = s (V − Kᵀ W)   [update: a-priori residual; downdate: Kᵀ W − V]   (u, d_v)
        E = torch.addmm(V, K.mT, W, alpha=-1.0)
        if sign < 0:
            E.neg_()
        # Y = L⁻¹ E, so that H Y = F S⁻¹ E = C_new K E  [the gain C_new K = F S⁻¹]   (u, d_v)
        Y = torch.linalg.solve_triangular(L, E.double(), upper=False).to(C.dtype)
        # every check, read back at once (one host sync), before any write
        w_abs_bound = self._verify(op, sign, K, V, S, L, info, H, Y)
        # C_new = C − s H Hᵀ   [Woodbury, in place; downdate: (C⁻¹ − KKᵀ)⁻¹]
        C.addmm_(H, H.mT, alpha=-float(sign))
        # W_new = W + C_new K s (V − Kᵀ W) = W + H Y   [in place]
        W.addmm_(H, Y)
        self._w_abs_bound = w_abs_bound
        self.n_keys_ += sign * u
        self.n_updates_ += 1
        self._last_S = S
        if self.symmetrize_every and self.n_updates_ % self.symmetrize_every == 0:
            self.symmetrize()
        return self

    def _prepare(self, K: object, V: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Check shapes and cast to the state's dtype and device (finiteness: :meth:`_verify`)."""
        K, V = require_batch(K, V, self.d_k, self.d_v)
        return K.to(device=self.device, dtype=self.dtype), V.to(device=self.device, dtype=self.dtype)

    def _verify(self, op, sign, K, V, S, L, info, H, Y) -> float:
        """Refuse the call unless every value it would write is finite and ``C`` stays PD.

        Returns the new upper bound on ``max |W|`` (the caller stores it once it commits).
        All quantities are reduced on the device and read back together, so a call costs
        one host synchronisation. In order, it refuses: non-finite ``K`` or ``V`` (checked
        after the cast, so a float64 value beyond float32's range counts), a non-finite or
        non-positive-definite ``S``, and results that could overflow or lose positive
        definiteness. The last are bounds in ``O(d_k u + u d_v)`` instead of passes over the
        ``d_k × d_v`` and ``d_k × d_k`` results (Cauchy–Schwarz; ``h_i = ‖H_i,:‖``,
        ``y_j = ‖Y_:,j‖``)::

            diag(C_new) = diag(C) − s h²                (must be > 0 and finite)
            |(C − s H Hᵀ)_ij| ≤ max diag(C) + max h²    (C is PD: |C_ij| ≤ max diag(C))
            |(W + H Y)_ij|    ≤ w_bound + max h · max y  (w_bound ≥ max |W|, kept up to date)

        A ``W`` bound that is not below half the dtype's largest value falls back to an
        exact finiteness check of ``W + HY`` (one extra pass); only an actual overflow is
        refused.
        """
        h_sq = (H * H).sum(dim=1)  # (d_k,)
        diag = self.C_.diagonal()
        new_diag = diag - sign * h_sq
        reductions = [
            torch.isfinite(K).all(),
            torch.isfinite(V).all(),
            torch.isfinite(S).all(),
            info,
            L.diagonal().min(),
            new_diag.min(),
            new_diag.max(),
            diag.max(),
            h_sq.max(),
            torch.linalg.vector_norm(Y, dim=0).max(),
            S.diagonal().sum(),
        ]
        (k_finite, v_finite, s_finite, info, l_min, new_min, new_max, diag_max, h_sq_max, y_max, s_trace) = torch.stack(
            [value.double() for value in reductions]
        ).tolist()
        if not k_finite:
            require_finite("K", K)
        if not v_finite:
            require_finite("V", V)
        what = f"{op}: S = I {'+' if sign > 0 else '-'} K^T C K"
        if not s_finite:
            raise NumericalError(f"{what} has non-finite entries (C or K far out of range); nothing was applied")
        if info != 0:
            raise NumericalError(
                f"{what} is not positive definite (leading minor {int(info)} of {S.shape[0]}); nothing was applied"
            )
        if sign > 0:
            _refuse_ill_conditioned(what, S, s_trace, self.dtype)
        if sign < 0 and l_min**2 < DOWNDATE_WARN_PIVOT:
            # S's eigenvalues lie in (0, 1]; a tiny one means the removed keys were almost the
            # only information in some direction, and the result inherits ~ eps / pivot error
            log.warning(
                "ill-conditioned downdate: S = I - K^T C K has a pivot of %.2e; expect a relative "
                "error of order %.0e / %.2e in C and W",
                l_min**2,
                torch.finfo(self.dtype).eps,
                l_min**2,
            )
        limit = 0.5 * torch.finfo(self.dtype).max
        if not all(map(math.isfinite, (new_min, new_max, h_sq_max, y_max))) or not new_min > 0.0:
            raise NumericalError(
                f"{op}: the new C would have a non-positive or non-finite diagonal (min {new_min:.3g}): "
                "positive definiteness lost to rounding, or keys far outside the anchor's scale; nothing was applied"
            )
        if not diag_max + h_sq_max < limit:
            raise NumericalError(f"{op}: the new C would overflow {self.dtype}; nothing was applied")
        w_bound = self._w_abs_bound + math.sqrt(h_sq_max) * y_max
        if not w_bound < limit:
            W_new = torch.addmm(self.W_, H, Y)
            require_finite(f"{op}: the new W", W_new)
            w_bound = float(W_new.abs().max())
        return w_bound

    @torch.no_grad()
    def symmetrize(self) -> None:
        """``C ← (C + Cᵀ)/2``: remove the antisymmetric part left by rounding.

        On CPU this runs tile by tile (:data:`SYMMETRIZE_TILE` square tiles and their mirror
        images), so the transposed reads stay in cache and no ``d_k × d_k`` temporary is
        allocated (24 ms → 3–4 ms at d_k = 1536 on one CPU thread here). On
        accelerators the whole-matrix expression is one fast kernel, and many small tiles
        would cost a launch each, so it is used there.
        """
        C = self.C_
        if C.device.type != "cpu":
            C.copy_((C + C.mT).mul_(0.5))
            return
        n, tile = C.shape[0], SYMMETRIZE_TILE
        for i in range(0, n, tile):
            for j in range(0, i + 1, tile):
                lower = C[i : i + tile, j : j + tile]
                upper = C[j : j + tile, i : i + tile]
                mean = (lower + upper.mT).mul_(0.5)
                lower.copy_(mean)
                upper.copy_(mean.mT)

    # ------------------------------------------------------------------ diagnostics
    def symmetry_error(self) -> float:
        """``‖C − Cᵀ‖_F / ‖C‖_F`` (0.0 when ``C`` is bitwise symmetric)."""
        C = self.C_
        return float(torch.linalg.matrix_norm(C - C.mT) / torch.linalg.matrix_norm(C))

    @property
    def last_S(self) -> torch.Tensor | None:
        """``S = I + KᵀC_{t−1}K`` (u, u) float64 of the last update/downdate; None before one."""
        return self._last_S

    def last_s_condition(self) -> float | None:
        """2-norm condition number of the last factored ``S`` (None before the first call)."""
        if self._last_S is None:
            return None
        eigenvalues = torch.linalg.eigvalsh(self._last_S)
        return float(eigenvalues[-1] / eigenvalues[0])

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor | float | int]:
        """Tensors ``C``, ``W``, ``W0`` (the live tensors, not copies) and scalar metadata.

        For safetensors, save the three tensors and store the scalars as strings
        (``repr`` of a Python float round-trips exactly); :meth:`from_state_dict` accepts
        either numbers or such strings.
        """
        return {
            "C": self.C_,
            "W": self.W_,
            "W0": self.W0,
            "lam": self.lam,
            "mu": self.mu,
            "jitter": self.jitter,
            "n_keys": self.n_keys_,
            "n_updates": self.n_updates_,
            "symmetrize_every": self.symmetrize_every,
            "format_version": STATE_FORMAT_VERSION,
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, object], *, device: torch.device | str | None = None
    ) -> RLSState:
        """Rebuild a state from :meth:`state_dict` output (tensors are copied).

        Refuses missing keys, an unknown ``format_version``, mismatched shapes or dtypes,
        and non-finite tensors.
        """
        missing = [key for key in (*_TENSOR_KEYS, *_SCALAR_KEYS) if key not in state]
        if missing:
            raise InvalidRequestError(f"RLS state is missing {missing}; expected keys {_TENSOR_KEYS + _SCALAR_KEYS}")
        version = _parse_scalar(state, "format_version", int)
        if version != STATE_FORMAT_VERSION:
            raise InvalidRequestError(
                f"RLS state format_version {version} is not supported (this code reads {STATE_FORMAT_VERSION})"
            )
        tensors = {}
        for key in _TENSOR_KEYS:
            tensor = require_matrix(key, state[key])
            require_finite(key, tensor)
            tensors[key] = tensor.detach().to(device=device if device is not None else tensor.device).clone()
        return cls(
            tensors["C"],
            tensors["W"],
            tensors["W0"],
            lam=_parse_scalar(state, "lam", float),
            mu=_parse_scalar(state, "mu", float),
            jitter=_parse_scalar(state, "jitter", float),
            n_keys=_parse_scalar(state, "n_keys", int),
            n_updates=_parse_scalar(state, "n_updates", int),
            symmetrize_every=_parse_scalar(state, "symmetrize_every", int),
        )


# ---------------------------------------------------------------------- helpers
def _refuse_ill_conditioned(what: str, S: torch.Tensor, trace: float, dtype: torch.dtype) -> None:
    """Refuse an update whose ``S = I + KᵀCK`` (PD, float64) has ``λ_max(S)`` over ``1/eps`` of
    the state ``dtype``.

    ``C_new = C − F S⁻¹ Fᵀ`` shrinks ``C`` by ``1/λ(S)`` along the directions ``CK``; beyond
    ``1/eps`` what remains there is below the rounding of ``C``'s other entries, so ``C`` can
    silently become indefinite (a float32 state fed one key 1e5 times the anchor's scale,
    ``λ_max(S)`` ≈ 3e8, gets a negative eigenvalue and no other check fires). Since
    ``λ_min(S) ≥ 1`` for an update, this also bounds ``cond(S)``. Real keys are far from it:
    on SmolLM2-135M (layers 3-7, CounterFact subjects, ``A = 15000·E[kkᵀ]``) ``kᵀC₀k`` is
    0.2-0.9, so a rank-one ``λ_max(S)`` is below 2, against a float32 limit of 8.4e6.
    ``trace`` (``tr(S) ≥ λ_max(S)``, already read back) spares the eigenvalues below the limit.
    """
    limit = 1.0 / torch.finfo(dtype).eps
    if trace <= limit:
        return
    eigenvalues = torch.linalg.eigvalsh(S)
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    if not high <= limit:
        raise NumericalError(
            f"{what} has largest eigenvalue {high:.3g} (condition number {high / low:.3g}), over 1/eps of "
            f"{dtype} ({limit:.3g}): the keys lie far outside the scale or span of the anchor, and the update "
            "would lose C's positive definiteness to rounding; nothing was applied")


def _factor_anchor(M: torch.Tensor, jitter: float | None) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``M + jitter·I`` (float64), applying the singular-anchor rule."""
    d_k = M.shape[0]
    if jitter is not None:
        jitter = require_nonnegative("jitter", jitter)
        if jitter > 0.0:
            M = M.clone()
            M.diagonal().add_(jitter)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            raise NumericalError(
                f"lam^2 I + mu^2 A + jitter I (jitter={jitter:g}) is not positive definite "
                f"(leading minor {int(info)} of {d_k}); use lam > 0, a larger jitter, or jitter=None"
            )
        return L, jitter
    mean_diagonal = float(M.diagonal().sum()) / d_k
    if not mean_diagonal > 0.0:
        raise InvalidRequestError(
            "the objective is unregularised: lam = 0 and there is no anchor (A is None, mu = 0 or A = 0), "
            "so C_0 = (lam^2 I + mu^2 A)^-1 does not exist; pass lam > 0, an anchor Gram with mu > 0, "
            "or an explicit jitter > 0"
        )
    floor = RELATIVE_JITTER * mean_diagonal
    L, info = torch.linalg.cholesky_ex(M)
    # the smallest Cholesky pivot L_ii² bounds λ_min(M) from above: a pivot below the floor
    # means M is numerically singular at the δ level
    if int(info) == 0 and float(L.diagonal().min()) ** 2 >= floor:
        return L, 0.0
    log.warning(
        "anchor lam^2 I + mu^2 A is singular or nearly so; adding jitter %.3e (= %g * trace / d_k) to lam^2",
        floor,
        RELATIVE_JITTER,
    )
    M = M.clone()
    M.diagonal().add_(floor)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise NumericalError(
            f"lam^2 I + mu^2 A is not positive definite even with jitter {floor:.3e} "
            f"(leading minor {int(info)} of {d_k}); is A positive semi-definite?"
        )
    return L, floor


def _parse_scalar(state: Mapping[str, object], key: str, kind: type) -> float | int:
    value = state[key]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"RLS state {key!r} must be {kind.__name__}-like, got {value!r}") from exc
