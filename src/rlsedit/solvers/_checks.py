"""Argument checks shared by the solvers: shapes, finiteness, scalars.

Every check raises before anything is computed or written, so a refused call changes
nothing. Shape and argument problems raise :class:`~rlsedit.errors.InvalidRequestError`
(a ``ValueError``); non-finite values and indefinite systems raise
:class:`~rlsedit.errors.NumericalError` (an ``ArithmeticError``).
"""

from __future__ import annotations

import math

import torch

from rlsedit.errors import InvalidRequestError, NumericalError

FLOAT_DTYPES = (torch.float32, torch.float64)


def require_matrix(name: str, value: object, *, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """Return ``value`` if it is a 2-D floating tensor with the given row/column counts."""
    if not isinstance(value, torch.Tensor):
        raise InvalidRequestError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise InvalidRequestError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise InvalidRequestError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if rows is not None and value.shape[0] != rows:
        raise InvalidRequestError(f"{name} must have {rows} rows, got shape {tuple(value.shape)}")
    if cols is not None and value.shape[1] != cols:
        raise InvalidRequestError(f"{name} must have {cols} columns, got shape {tuple(value.shape)}")
    return value


def require_square(name: str, value: object, size: int | None = None) -> torch.Tensor:
    """Return ``value`` if it is a square 2-D floating tensor (of side ``size`` if given)."""
    value = require_matrix(name, value, rows=size, cols=size)
    if value.shape[0] != value.shape[1]:
        raise InvalidRequestError(f"{name} must be square, got shape {tuple(value.shape)}")
    return value


def require_finite(name: str, value: torch.Tensor) -> None:
    """Refuse NaN or infinite entries (one reduction; a device sync on accelerators)."""
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise NumericalError(f"{name} has {bad} non-finite entries (NaN or inf); nothing was applied")


def require_nonnegative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0.0:
        raise InvalidRequestError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def require_symmetric(name: str, value: torch.Tensor, *, rtol: float = 1e-5) -> None:
    """Refuse a matrix whose antisymmetric part exceeds ``rtol`` of its Frobenius norm."""
    scale = float(torch.linalg.matrix_norm(value))
    asym = float(torch.linalg.matrix_norm(value - value.mT))
    if asym > rtol * max(scale, torch.finfo(torch.float64).tiny):
        raise InvalidRequestError(
            f"{name} must be symmetric: ||{name} - {name}^T|| / ||{name}|| = {asym / scale:.3g} > {rtol:g}"
        )


def require_batch(K: object, V: object, d_k: int, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one batch of keys ``K (d_k, u)`` and targets ``V (u, d_v)``; return them."""
    K = require_matrix("K", K, rows=d_k)
    if K.shape[1] == 0:
        raise InvalidRequestError("K must hold at least one key column, got shape (d_k, 0)")
    V = require_matrix("V", V, rows=K.shape[1], cols=d_v)
    return K, V
