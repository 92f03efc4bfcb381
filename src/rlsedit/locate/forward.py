"""Partial forward passes: run a model only as far as one module, or only the blocks above one.

* :func:`read_module` runs the model until a module is reached, keeps that module's input
  or output and stops the forward there (a private exception raised from the hook), so
  nothing above it is computed.
* :func:`capture_above` runs the model once, keeping the output of block ``layer`` and the
  exact arguments the model passes to every block above it (attention masks, rotary
  embeddings, ... — per block, since e.g. Gemma 3 alternates sliding and full attention).
  :func:`run_above` then replays those blocks on a changed residual stream without
  re-running the embedding and the blocks below.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import UnsupportedError
from ..model.weights import block


class _StopForward(Exception):
    """Raised by a hook once it has what it came for; never escapes this module."""


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict, bool]:
    """A block call's hidden states and the remaining arguments (positional or keyword)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), True
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest, False


@contextmanager
def _hooked(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    try:
        lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass


def read_module(lm, module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *, read: str) -> torch.Tensor:
    """The first input (``read="input"``) or output (``read="output"``) of ``module`` on a
    batch, computed without gradients; the forward stops at the module."""
    seen: list[torch.Tensor] = []
    if read == "input":
        def hook(_mod, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    elif read == "output":
        def hook(_mod, _args, output):
            seen.append(_first(output))
            raise _StopForward
        handle = module.register_forward_hook(hook)
    else:
        raise ValueError(f"read must be 'input' or 'output', got {read!r}")
    with torch.no_grad(), _hooked([handle]):
        _run(lm, input_ids, attention_mask)
    if not seen:
        raise UnsupportedError(f"the model's forward never called {type(module).__name__}; check its architecture entry")
    return seen[0]


@dataclass
class BlockCalls:
    """The arguments of one forward's calls to blocks ``first..n_layers-1``.

    Attributes:
        first: the index of the first replayed block (``layer + 1``).
        calls: per block, ``(positional args after the hidden states, keyword args,
            hidden_is_positional)``; the key/value cache among them is replaced by a marker.
        batch: the batch size they were captured with.
        cache: when the capture ran on a suffix, the key/value cache of the prefix (a
            snapshot: every replay works on a fresh shallow copy, so the suffix keys a
            replay appends never reach the next one).
    """

    first: int
    calls: list[tuple[tuple, dict, bool]]
    batch: int
    cache: object = None


_CACHE = object()  # stands for the prefix cache inside captured block arguments


class _DroppedLayer:
    """Stands for a cache layer of a block below the replayed ones (never read by a replay:
    a block reads only its own layer of the cache); any use is a loud error."""

    def __init__(self, index: int):
        self.__dict__["index"] = index

    def __getattr__(self, name):
        raise UnsupportedError(f"a replay read the key/value cache of block {self.index}, below the replayed blocks")


def _cache_argument(lm) -> str:
    # transformers >= 5.24 names the cache argument ``cache``; earlier 5.x ``past_key_values``
    params = inspect.signature(lm.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _copy_cache(cache, index: torch.Tensor | None = None, batch: int | None = None):
    """A shallow copy of a layered key/value cache whose layers can be updated without
    touching ``cache``; with ``index``, batch-shaped layer tensors keep only those rows.

    Relies on the layers replacing their tensors on update (``DynamicCache`` concatenates
    into new tensors); :func:`capture_above` refuses a cache that writes in place.
    """
    fresh = copy.copy(cache)
    layers = []
    for layer in cache.layers:
        if isinstance(layer, _DroppedLayer):
            layers.append(layer)
            continue
        twin = copy.copy(layer)
        if index is not None:
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                    setattr(twin, name, value.index_select(0, index.to(value.device)))
        layers.append(twin)
    fresh.layers = layers
    return fresh


def capture_above(lm, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  *, split: int = 0, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, BlockCalls]:
    """Output of block ``layer`` and the calls of the blocks above it, without gradients.

    With ``split = S > 0`` the first ``S`` columns run once as a
    prefix whose keys and values are cached; the returned states ``(B, L − S, d_model)``
    and block calls cover columns ``S..L-1`` only, so replays never recompute the prefix.
    Nothing in the prefix depends on an edit at or after column ``S`` (causal attention).
    ``position_ids`` (``(B, L)``) are needed where rows are left-padded. The capturing
    forward stops before the last block runs.
    """
    n = lm.n_layers
    calls: list = [None] * (n - layer - 1)
    entering: list[torch.Tensor] = []
    out: list[torch.Tensor] = []
    handles = []
    snapshot = live_cache = None
    extra = {}
    if position_ids is not None:
        extra["position_ids"] = position_ids[:, split:]
    if split > 0:
        with torch.no_grad():
            head = {} if position_ids is None else {"position_ids": position_ids[:, :split]}
            # the decoder alone: the prefix needs no logits (and an LM head on a 3-D batch is
            # slow in bfloat16 on CPU, where torch expands the weight per row)
            prefix = lm.model.base_model(input_ids=input_ids[:, :split], attention_mask=attention_mask[:, :split],
                                         use_cache=True, **head)
        cache = getattr(prefix, "cache", None)
        if cache is None:  # transformers < 5.24 names it past_key_values
            cache = getattr(prefix, "past_key_values", None)
        if cache is None or not hasattr(cache, "layers"):
            raise UnsupportedError(f"{type(lm.model).__name__} returned no layered key/value cache")
        snapshot, live_cache = _copy_cache(cache), cache
        extra[_cache_argument(lm)] = cache
        input_ids = input_ids[:, split:]

    def keep_output(_mod, _args, output):
        out.append(_first(output))
        if layer == n - 1:
            raise _StopForward

    handles.append(block(lm, layer).register_forward_hook(keep_output))
    for j in range(layer + 1, n):
        def keep_call(_mod, args, kwargs, j=j):
            hidden, rest, kw, positional = _split_hidden(args, kwargs)
            if snapshot is not None:
                rest = tuple(_CACHE if v is live_cache else v for v in rest)
                kw = {k: (_CACHE if v is live_cache else v) for k, v in kw.items()}
            calls[j - layer - 1] = (rest, kw, positional)
            if j == layer + 1:
                entering.append(hidden)
            if j == n - 1:
                raise _StopForward
        handles.append(block(lm, j).register_forward_pre_hook(keep_call, with_kwargs=True))
    with torch.no_grad(), _hooked(handles):
        try:
            lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=snapshot is not None, **extra)
        except _StopForward:
            pass
    if snapshot is not None and any(
            getattr(snap, "keys", None) is not None and getattr(snap, "keys", None) is getattr(live, "keys", None)
            for snap, live in zip(snapshot.layers[: layer + 1], live_cache.layers)):
        raise UnsupportedError(f"{type(live_cache).__name__} updates its tensors in place; cannot replay from it")
    if snapshot is not None:
        # the replay runs blocks layer+1.. only: the prefix keys and values of blocks 0..layer
        # (9 of SmolLM2's 30 at layer 8) are never read again
        snapshot.layers[: layer + 1] = [_DroppedLayer(i) for i in range(min(layer + 1, len(snapshot.layers)))]
    if not out or any(call is None for call in calls):
        raise UnsupportedError("the model's forward did not call every block; check its architecture entry")
    if entering and not torch.equal(entering[0], out[0]):
        raise UnsupportedError(
            f"the model changes the residual stream between blocks {layer} and {layer + 1}; "
            "replaying the blocks above the edited layer would be wrong for it"
        )
    if snapshot is not None and layer < n - 1 and not any(
            v is _CACHE for rest, kw, _pos in calls for v in (*rest, *kw.values())):
        raise UnsupportedError(f"{type(lm.model).__name__} does not pass its key/value cache to the blocks")
    return out[0], BlockCalls(first=layer + 1, calls=calls, batch=int(input_ids.shape[0]), cache=snapshot)


def run_above(lm, hidden: torch.Tensor, calls: BlockCalls) -> torch.Tensor:
    """Replay blocks ``calls.first..n_layers-1`` on ``hidden (B, L, d_model)``."""
    cache = None if calls.cache is None else _copy_cache(calls.cache)
    h = hidden
    for offset, (rest, kwargs, positional) in enumerate(calls.calls):
        if cache is not None:
            rest = tuple(cache if v is _CACHE else v for v in rest)
            kwargs = {k: (cache if v is _CACHE else v) for k, v in kwargs.items()}
        module = block(lm, calls.first + offset)
        h = _first(module(h, *rest, **kwargs) if positional else module(*rest, hidden_states=h, **kwargs))
    return h


def _take_rows(value, index: torch.Tensor, batch: int):
    # Batch-shaped tensors (2-D or more, leading dim == batch) follow the row selection;
    # shared tensors (rotary tables of batch 1, cache positions, scalars) stay as they are.
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            return value.index_select(0, index.to(value.device))
        return value
    if isinstance(value, tuple):
        return tuple(_take_rows(v, index, batch) for v in value)
    if isinstance(value, list):
        return [_take_rows(v, index, batch) for v in value]
    if isinstance(value, dict):
        return {k: _take_rows(v, index, batch) for k, v in value.items()}
    return value


def select_rows(calls: BlockCalls, index: torch.Tensor) -> BlockCalls:
    """The same block calls (and prefix cache) restricted to batch rows ``index``."""
    if calls.batch == 1:
        # Leading dims of 1 are ambiguous (batch or broadcast); only all-or-nothing happens.
        assert index.numel() == 1, index
        return calls
    picked = [(_take_rows(rest, index, calls.batch), _take_rows(kw, index, calls.batch), positional)
              for rest, kw, positional in calls.calls]
    cache = None if calls.cache is None else _copy_cache(calls.cache, index, calls.batch)
    return BlockCalls(first=calls.first, calls=picked, batch=int(index.numel()), cache=cache)
