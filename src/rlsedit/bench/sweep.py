"""The RLSEdit sweep of the method benchmark: its grammar and the names of its runs.

``--sweep 'lambda=0,0.1;mu=0.5,1'`` is the product grid of the listed values; each point is
one run, reported as ``rlsedit[lambda_reg=0.1,mu_reg=1]`` and kept in the folder
:func:`run_dir_name` gives that name.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from ..errors import InvalidRequestError

# short names of the sweepable hyperparameters (--sweep lambda=…;mu=…) -> config field
SWEEP_ALIASES = {"lambda": "lambda_reg", "lam": "lambda_reg", "mu": "mu_reg", "n": "mom2_update_weight"}
SWEEP_METHOD = "rlsedit"


def parse_sweep(text: str | None) -> list[dict[str, float | tuple[int, ...]]]:
    """``'lambda=0,0.1;mu=0.5,1'`` → the grid ``[{lambda_reg: 0, mu_reg: 0.5}, …]`` (product, in order).

    Keys are RLSEdit config fields or the aliases ``lambda``/``lam``/``mu``/``n``; values are
    finite floats, except for ``layers``, whose values are bands ``4-8`` or lists ``4+6+8``.
    """
    if text is None or not text.strip():
        return []
    from ..editors.config import RLSEditConfig

    fields = {f.name for f in dataclasses.fields(RLSEditConfig)}
    axes: list[tuple[str, list[float | tuple[int, ...]]]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise InvalidRequestError(f"sweep: expected NAME=v1,v2 in {part!r}")
        key, values_text = part.split("=", 1)
        key = SWEEP_ALIASES.get(key.strip(), key.strip())
        if key not in fields:
            raise InvalidRequestError(f"sweep: {key!r} is not an RLSEdit hyperparameter")
        if any(key == k for k, _ in axes):
            raise InvalidRequestError(f"sweep: {key!r} is given twice")
        texts = [v.strip() for v in values_text.split(",") if v.strip()]
        if not texts:
            raise InvalidRequestError(f"sweep: {part!r} has no values")
        axes.append((key, [_sweep_layers(v, part) if key == "layers" else _sweep_number(v, part) for v in texts]))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def _sweep_number(text: str, part: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequestError(f"sweep: {part!r} has a value that is not a number") from None
    if not math.isfinite(value):
        raise InvalidRequestError(f"sweep: {part!r} needs finite numbers")
    return value


def _sweep_layers(text: str, part: str) -> tuple[int, ...]:
    """``4-8`` → (4, 5, 6, 7, 8); ``4+6+8`` → (4, 6, 8)."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            layers = tuple(range(first, last + 1))
        else:
            layers = tuple(int(x) for x in text.split("+"))
    except ValueError:
        raise InvalidRequestError(f"sweep: {part!r}: layers are a band like 4-8 or a list like 4+6+8") from None
    if not layers or any(x < 0 for x in layers) or list(layers) != sorted(set(layers)):
        raise InvalidRequestError(f"sweep: {part!r}: {text!r} is not an ascending set of layers")
    return layers


def sweep_value_text(value: Any) -> str:
    """A swept setting as text: layers as a band ``4-8`` or a list ``4+6+8``, floats by ``:g``."""
    if isinstance(value, (list, tuple)):
        if len(value) > 1 and list(value) == list(range(value[0], value[-1] + 1)):
            return f"{value[0]}-{value[-1]}"
        return "+".join(str(x) for x in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_run_name(point: dict[str, float | tuple[int, ...]]) -> str:
    """``rlsedit[lambda_reg=0.1,mu_reg=1]`` — the name a sweep point's run is reported under."""
    return f"{SWEEP_METHOD}[" + ",".join(f"{k}={sweep_value_text(v)}" for k, v in point.items()) + "]"


def is_sweep_run(run_name: str) -> bool:
    """Whether ``run_name`` names a sweep point (spelled by :func:`sweep_run_name`), not a method."""
    return run_name.startswith(f"{SWEEP_METHOD}[")


def run_dir_name(run_name: str) -> str:
    """A file-system-safe folder name for a run (``rlsedit[mu_reg=1]`` → ``rlsedit_mu_reg-1``)."""
    out = run_name.replace("[", "_").replace("]", "").replace("=", "-").replace(",", "_")
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in out)
