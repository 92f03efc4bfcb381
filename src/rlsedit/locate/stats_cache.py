"""The disk cache of corpus second moments: one safetensors file + one JSON file per entry.

An entry's key covers everything that determines the statistic (see :mod:`.stats`); the
weights that can change a layer's keys are hashed by :func:`upstream_sha256`, so statistics
of an edited model never pose as the original's. A damaged or mismatched entry is ignored
(logged) and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from ..files import atomic_replace, file_sha256
from ..model.arch import resolve
from ..model.weights import down_proj
from .moment import SecondMoment

log = logging.getLogger(__name__)


def upstream_sha256(lm, layers: Sequence[int]) -> dict[int, str]:
    """Per layer, sha256 of every weight that can change its keys.

    Keys at layer ``l`` depend on everything outside the block stack (embeddings, positions;
    the final norm and head come along, editors never touch them) and on blocks ``0..l``
    except block ``l``'s own down projection, which only sees the key.
    """
    stack = resolve(lm.model, lm.arch.layers)
    in_stack = {id(p) for p in stack.parameters()}
    digest = hashlib.sha256()

    def feed(name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy())

    for name, param in lm.model.named_parameters():
        if id(param) not in in_stack:
            feed(name, param)
    wanted = set(layers)
    out: dict[int, str] = {}
    for index in range(max(layers) + 1):
        blk = stack[index]
        down = {id(p) for p in down_proj(lm, index).parameters()}
        for name, param in blk.named_parameters():
            if id(param) not in down:
                feed(f"{index}.{name}", param)
        if index in wanted:
            out[index] = digest.copy().hexdigest()
        for name, param in down_proj(lm, index).named_parameters():
            feed(f"{index}.down.{name}", param)
    return out


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


def read_cached(tensor_path: Path, meta_path: Path, fields: dict, d_k: int) -> SecondMoment | None:
    """The cached statistic if both files exist and agree with the request, else None."""
    from safetensors.torch import load_file

    if not (tensor_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if any(meta.get(k) != v for k, v in fields.items()):
            log.warning("stats cache entry %s does not match its request; recomputing", meta_path)
            return None
        if meta.get("sha256") != file_sha256(tensor_path)[0]:
            log.warning("stats cache file %s fails its checksum; recomputing", tensor_path)
            return None
        mom = load_file(str(tensor_path))["mom"]
    except (OSError, ValueError, KeyError) as exc:
        log.warning("unreadable stats cache entry %s (%s); recomputing", tensor_path, exc)
        return None
    if mom.shape != (d_k, d_k) or mom.dtype != torch.float64 or not torch.isfinite(mom).all():
        log.warning("stats cache entry %s has a wrong shape, dtype or values; recomputing", tensor_path)
        return None
    return SecondMoment(mom=mom, count=int(meta["count"]))


def write_cached(tensor_path: Path, meta_path: Path, fields: dict, moment: SecondMoment,
                  extra: dict) -> None:
    from safetensors.torch import save_file

    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    mom = moment.mom.detach().to("cpu").contiguous()
    atomic_replace(tensor_path, lambda tmp: save_file({"mom": mom}, str(tmp),
                                                     metadata={"key": tensor_path.stem}))
    meta = dict(fields)
    meta.update(extra)
    meta.update(count=moment.count, shape=list(mom.shape), sha256=file_sha256(tensor_path)[0])
    atomic_replace(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1, sort_keys=True)))
