"""Partial forward passes: run a model only as far as one module, or only the blocks above one.

* :func:`read_module` runs the model until a module is reached, keeps that module's input
  or output and stops the forward there (a private exception raised from the hook), so
  nothing above it is computed.
* :func:`capture_above` runs the model once, keeping the output of block ``layer`` and the
  exact arguments the model passes to every block above it (attention masks, rotary
  embeddings, ... — per block, since e.g. Gemma 3 alternates sliding and full attention).
  :func:`run_above` then replays those blocks on a changed residual stream without
  re-running the embedding and the blocks below.
* :func:`capture_entering` runs the model once up to block ``first``, keeping the state
  entering it and the arguments of blocks ``first..last`` without running any of them;
  :func:`run_blocks` and :func:`read_in_block` then run those blocks one at a time with the
  weights as they are at that moment (a batch's keys, layer after edited layer).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import UnsupportedError
from ..model.cache import cache_kwarg
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
    with torch.no_grad(), _hooked([_stop_at(module, read, seen)]):
        _run(lm, input_ids, attention_mask)
    return _only(seen, module)


def _stop_at(module: torch.nn.Module, read: str, seen: list):
    """A hook on ``module`` that appends its first input or output to ``seen`` and stops the forward."""
    if read == "input":
        def hook(_mod, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    if read == "output":
        def hook(_mod, _args, output):
            seen.append(_first(output))
            raise _StopForward
        return module.register_forward_hook(hook)
    raise ValueError(f"read must be 'input' or 'output', got {read!r}")


def _only(seen: list, module: torch.nn.Module) -> torch.Tensor:
    if not seen:
        raise UnsupportedError(f"the model's forward never called {type(module).__name__}; check its architecture entry")
    return seen[0]


@dataclass
class BlockCalls:
    """The arguments of one forward's calls to blocks ``first..last`` (:func:`capture_above`:
    ``last = n_layers - 1``).

    Attributes:
        first: the index of the first replayed block (:func:`capture_above`: ``layer + 1``).
        calls: per block ``first, first + 1, ..``, ``(positional args after the hidden states,
            keyword args, hidden_is_positional)``; the key/value cache among them is replaced by a marker.
        batch: the batch size they were captured with.
        cache: when the capture ran on a suffix, the key/value cache of the prefix (a
            snapshot: every replay works on a fresh shallow copy, so the suffix keys a
            replay appends never reach the next one).
    """

    first: int
    calls: list[tuple[tuple, dict, bool]]
    batch: int
    cache: object = None

    @property
    def last(self) -> int:
        """The index of the last block whose call is kept."""
        return self.first + len(self.calls) - 1


_CACHE = object()  # stands for the prefix cache inside captured block arguments


class _DroppedLayer:
    """Stands for a cache layer of a block below the replayed ones (never read by a replay:
    a block reads only its own layer of the cache); any use is a loud error."""

    def __init__(self, index: int):
        self.__dict__["index"] = index

    def __getattr__(self, name):
        raise UnsupportedError(f"a replay read the key/value cache of block {self.index}, below the replayed blocks")


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
        extra[cache_kwarg(lm.model)] = cache
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
    """Replay blocks ``calls.first..calls.last`` on ``hidden (B, L, d_model)``."""
    return run_blocks(lm, hidden, calls, calls.first, calls.last + 1)


def run_blocks(lm, hidden: torch.Tensor, calls: BlockCalls, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start..stop-1`` (inside ``calls.first..calls.last``) on ``hidden (B, L, d_model)``
    with their captured arguments; ``hidden`` itself when ``start == stop``."""
    if not calls.first <= start <= stop <= calls.last + 1:
        raise ValueError(f"blocks {start}..{stop - 1} are outside the captured blocks {calls.first}..{calls.last}")
    cache = None if calls.cache is None else _copy_cache(calls.cache)
    h = hidden
    for index in range(start, stop):
        h = _first(_call_block(lm, index, h, calls, cache))
    return h


def read_in_block(lm, hidden: torch.Tensor, calls: BlockCalls, layer: int, module: torch.nn.Module,
                  *, read: str) -> torch.Tensor:
    """Run block ``layer`` (one of ``calls``) on ``hidden`` until ``module`` inside it is reached:
    that module's first input or output (as :func:`read_module`), without gradients; the rest of
    the block is not computed."""
    if not calls.first <= layer <= calls.last:
        raise ValueError(f"block {layer} is outside the captured blocks {calls.first}..{calls.last}")
    seen: list[torch.Tensor] = []
    cache = None if calls.cache is None else _copy_cache(calls.cache)
    with torch.no_grad(), _hooked([_stop_at(module, read, seen)]):
        try:
            _call_block(lm, layer, hidden, calls, cache)
        except _StopForward:
            pass
    return _only(seen, module)


def _call_block(lm, index: int, hidden: torch.Tensor, calls: BlockCalls, cache):
    """Block ``index`` called on ``hidden`` with its captured arguments (``cache``, a fresh copy of
    the prefix cache, in place of the marker)."""
    rest, kwargs, positional = calls.calls[index - calls.first]
    if cache is not None:
        rest = tuple(cache if v is _CACHE else v for v in rest)
        kwargs = {k: (cache if v is _CACHE else v) for k, v in kwargs.items()}
    module = block(lm, index)
    return module(hidden, *rest, **kwargs) if positional else module(*rest, hidden_states=hidden, **kwargs)


@contextmanager
def _passed_through(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Each module returns its hidden-state input unchanged instead of computing (its hooks
    still run); the modules' own ``forward`` comes back on exit."""
    saved = [module.__dict__.get("forward") for module in modules]

    def through(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    try:
        for module in modules:
            module.forward = through
        yield
    finally:
        for module, own in zip(modules, saved):
            if own is None:
                del module.forward
            else:  # e.g. an accelerate hook installed on the instance
                module.forward = own


def capture_entering(lm, first: int, last: int, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, BlockCalls]:
    """The residual stream entering block ``first`` ``(B, L, d_model)`` and the calls of blocks
    ``first..last``, without gradients or a key/value cache.

    One forward from the embedding: blocks ``0..first-1`` run, blocks ``first..last`` do not
    (each passes its input through while its arguments are kept), and the forward stops at
    block ``last``. Meant for right-padded rows (no ``position_ids``).
    """
    n = lm.n_layers
    if not 0 <= first <= last < n:
        raise ValueError(f"need 0 <= first <= last < {n}, got first={first}, last={last}")
    calls: list = [None] * (last - first + 1)
    passed: list[torch.Tensor] = []  # the state each block received

    def keep_call(_mod, args, kwargs, j):
        hidden, rest, kw, positional = _split_hidden(args, kwargs)
        if passed and hidden is not passed[-1]:
            raise UnsupportedError(
                f"the model changes the residual stream between blocks {j - 1} and {j}; "
                "running the blocks one at a time would be wrong for it")
        passed.append(hidden)
        calls[j - first] = (rest, kw, positional)
        if j == last:
            raise _StopForward

    modules = [block(lm, j) for j in range(first, last + 1)]
    handles = [module.register_forward_pre_hook(lambda m, a, k, j=j: keep_call(m, a, k, j), with_kwargs=True)
               for j, module in zip(range(first, last + 1), modules)]
    with torch.no_grad(), _hooked(handles), _passed_through(modules[:-1]):
        _run(lm, input_ids, attention_mask)
    if any(call is None for call in calls):
        raise UnsupportedError("the model's forward did not call every block; check its architecture entry")
    return passed[0], BlockCalls(first=first, calls=calls, batch=int(input_ids.shape[0]))


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
