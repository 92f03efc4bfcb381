"""The unedited model's teacher-forced argmaxes that EasyEdit's locality compares against.

EasyEdit's locality of a neighbourhood prompt ``n`` with answer ``a`` is the share of answer
tokens whose teacher-forced argmax after editing equals the one before:
``(1/|a|) Σ_j [argmax_post_j = argmax_pre_j]`` (:mod:`rlsedit.eval.counterfact`,
:mod:`rlsedit.eval.zsre`). The *pre* side has to come from the unedited model. For an edited
state it need not be loaded again: every editor writes only the down projections of its edited
layers and keeps their unedited values ``W_0`` (``session.editor.W0``, the tensors ``reset`` and
``export --delta-only`` use too), so :func:`unedited_weights` puts ``W_0`` back for the time of
the recording and then restores the edited weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from ..model.weights import down_proj, get_W, set_W
from ..requests import EditRequest
from .counterfact import neighborhood_predictions
from .zsre import DEFAULT_CONVENTION, locality_predictions


@contextlib.contextmanager
def unedited_weights(session) -> Iterator:
    """``session.lm`` holding the unedited weights ``W_0`` of the edited layers inside the ``with``
    block; the edited weights are written back when it ends, also on an error."""
    editor, lm = session.editor, session.lm
    # copies in the parameter's own dtype, so writing them back restores the weights bit for bit
    edited = {l: get_W(lm, l, dtype=down_proj(lm, l).weight.dtype) for l in editor.layers}
    try:
        for l in editor.layers:
            set_W(lm, l, editor.W0[l])
        yield lm
    finally:
        for l, W in edited.items():
            set_W(lm, l, W)


def pre_edit_locality(lm, *, counterfact: Sequence[EditRequest] | None = None,
                      zsre: Sequence[EditRequest] | None = None, zsre_convention: str = DEFAULT_CONVENTION,
                      batch_size: int = 16) -> dict[str, dict[str, list[list[int]]]]:
    """Per edit suite, the unedited ``lm``'s argmaxes on every neighbourhood prompt + answer, keyed by
    request id (``zsre`` under ``zsre_convention``, which appends ``"?"`` to the prompts for
    ``"memit"``): what :func:`rlsedit.eval.runner.run_eval` takes as ``pre_edit_locality``. Plain JSON."""
    out: dict[str, dict[str, list[list[int]]]] = {}
    if counterfact:
        out["counterfact"] = neighborhood_predictions(lm, counterfact, batch_size=batch_size)
    if zsre:
        out["zsre"] = locality_predictions(lm, zsre, convention=zsre_convention, batch_size=batch_size)
    return out
