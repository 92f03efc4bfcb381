"""Second-moment files written by the official MEMIT/AlphaEdit/RLSEdit code, read without unpickling."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequestError, NumericalError, StateCorruptError, StateMismatchError
from .moment import SecondMoment


_MEMIT_KEYS = (("mom2.mom2", "mom2.count"), ("mom2", "count"))


def _moment_from_mapping(data: dict, available: list[str], source: str) -> SecondMoment:
    """MEMIT's ``SecondMoment`` state: ``mom2`` is the SUM ``Σ k kᵀ``, ``count`` the tokens."""
    for sum_key, count_key in _MEMIT_KEYS:
        if sum_key in data and count_key in data:
            total, count = data[sum_key], data[count_key]
            break
    else:
        raise StateCorruptError(
            f"{source}: no MEMIT second-moment entries found (expected keys 'mom2.mom2' and "
            f"'mom2.count', or 'mom2' and 'count'; found {sorted(available)})"
        )
    total = total if torch.is_tensor(total) else torch.from_numpy(np.asarray(total))
    count_array = np.asarray(count.cpu() if torch.is_tensor(count) else count)
    if count_array.size != 1 or not np.issubdtype(count_array.dtype, np.number):
        raise StateCorruptError(f"{source}: count must be a single number, got {count_array!r}")
    count = int(count_array.reshape(()))
    if total.ndim != 2 or total.shape[0] != total.shape[1]:
        raise StateCorruptError(f"{source}: mom2 must be a square matrix, got shape {tuple(total.shape)}")
    if count <= 0:
        raise StateCorruptError(f"{source}: count must be positive, got {count}")
    total = total.to(torch.float64)
    if not torch.isfinite(total).all():
        raise NumericalError(f"{source}: mom2 holds non-finite values")
    # E[kkᵀ] = mom2 / count   (MEMIT's SecondMoment.moment())
    return SecondMoment(mom=(total / count).contiguous(), count=count)


def load_stats_file(path: str | Path, *, d_k: int | None = None) -> SecondMoment:
    """Read MEMIT/AlphaEdit/RLSEdit statistics (``layer_stats.py`` output) as a SecondMoment.

    ``.npz`` files (``numpy.load(allow_pickle=False)``) and ``.pt`` files
    (``torch.load(weights_only=True)``) holding MEMIT's ``CombinedStat`` state
    (``mom2.mom2`` = ``Σ k kᵀ``, ``mom2.count`` = number of tokens) or a bare ``SecondMoment``
    state (``mom2``, ``count``). Nothing is unpickled. ``d_k``, when given (``lm.d_k``), must
    match the matrix, else :class:`~rlsedit.errors.StateMismatchError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"statistics file {str(path)!r} does not exist")
    source = str(path)
    wanted = {key for pair in _MEMIT_KEYS for key in pair}
    if path.suffix == ".npz":
        # np.load falls back to unpickling for anything that is not a zip archive.
        if not zipfile.is_zipfile(path):
            raise StateCorruptError(f"{source}: not an .npz (zip) archive")
        try:
            with np.load(path, allow_pickle=False) as npz:
                available = list(npz.files)
                # Only the numeric entries we need are read; an object (pickled) array there
                # raises ValueError under allow_pickle=False.
                data = {key: npz[key] for key in available if key in wanted}
        except ValueError as exc:
            raise StateCorruptError(
                f"{source}: cannot be read without unpickling ({exc}); only plain numeric arrays are accepted"
            ) from None
        except (OSError, EOFError) as exc:
            raise StateCorruptError(f"{source}: not a readable .npz file ({exc})") from None
    elif path.suffix == ".pt":
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise StateCorruptError(
                f"{source}: not loadable with torch.load(weights_only=True) "
                f"({type(exc).__name__}: {first_line})"
            ) from None
        if not isinstance(loaded, dict):
            raise StateCorruptError(
                f"{source}: expected a dict with 'mom2' and 'count' entries, got {type(loaded).__name__}"
            )
        available = [str(key) for key in loaded]
        data = {key: value for key, value in loaded.items() if key in wanted}
    else:
        raise InvalidRequestError(f"{source}: unknown statistics format {path.suffix!r}; expected .npz or .pt")
    moment = _moment_from_mapping(data, available, source)
    if d_k is not None and moment.d_k != d_k:
        raise StateMismatchError(
            f"{source}: statistics are {moment.d_k}x{moment.d_k} but the model's down projection "
            f"has d_k = {d_k}; they belong to another model or layer type"
        )
    return moment
