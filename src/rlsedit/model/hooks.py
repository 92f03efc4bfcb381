"""Forward hooks: read a module's input/output, or change its output, for one ``with`` block.

Every hook is removed in ``finally``, so an exception inside the block never leaves a hook
behind.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture(module: torch.nn.Module, *, inputs: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect the module's first positional input (or its output) on every forward call."""
    seen: list[torch.Tensor] = []

    def hook(_mod, args, output):
        seen.append(_first(args) if inputs else _first(output))

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def edit_output(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's output ``y`` (first element if a tuple) by ``fn(y)``."""

    def hook(_mod, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
