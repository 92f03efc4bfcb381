"""Keys: what block ``layer``'s MLP down projection reads at the subject's last token.

For request ``i`` with prompt text ``x_i`` and context prefixes ``p_1..p_P``:

    k_i = Σ_p  w_p · mlp_down_in_layer( p.replace("{}", x_i) )[s_{i,p}]      (d_k,)

where ``s_{i,p}`` is the subject's last token in that text and ``w`` the prefix weights
(:func:`prefix_weights`, summing to 1). MEMIT's, AlphaEdit's and RLSEdit's ``compute_ks``
take the mean over template *types* of the mean within each type; their types are the bare
prompt ``["{}"]`` and the generated prefixes, so the bare prompt weighs ½ and each of the
``P − 1`` generated prefixes ``½/(P − 1)`` (``average="per_type"``). ROME's ``compute_u``
averages its flat template list uniformly, ``w_p = 1/P`` (``average="uniform"``). The keys
of a batch are the columns of ``K (d_k, u)``.

With rewordings of the request (``paraphrases[i]``, :mod:`~rlsedit.locate.paraphrases`) the
sum also runs over request ``i``'s rewording rows (:func:`~rlsedit.locate.tokens.prompt_texts`:
rewording ``j`` behind prefix ``(1 + j) % P``), so the key stands for the subject in the
contexts the request is asked in as well: :func:`row_weights` makes them a third type
(``"per_type"``: bare, generated prefixes and rewordings weigh ⅓ each) or ``1/(P + k)`` rows
alike (``"uniform"``).

:func:`compute_keys` runs every text from the embedding to block ``layer``. A batch edits
several layers ``l_1 < .. < l_m`` in turn, writing each before the keys of the next are read;
:class:`BatchKeys` runs the embedding and the blocks below ``l_1`` once per batch and then
each block once, after the layers below it were written — the same keys (up to float32
rounding) for about a third of the block passes (SmolLM2, layers 4..8, six prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidRequestError, NumericalError, UnsupportedError
from ..model.weights import down_proj
from ..requests import SUBJECT_SLOT
from .forward import BlockCalls, capture_entering, read_in_block, read_module, run_blocks, select_rows
from .targets import hidden_at_subject
from .tokens import (check_layer, check_prefixes, encode_at_subject, encode_through_subject, length_sorted_chunks,
                     pad_id, pad_right, prompt_texts)

DEFAULT_BATCH_SIZE = 64
"""Sequences per forward pass (bounds memory; results do not depend on it)."""

AVERAGES = ("per_type", "uniform")
"""How keys are averaged over prefixes: MEMIT's mean of per-type means, or a plain mean."""


def prefix_weights(prefixes, average: str = "per_type") -> torch.Tensor:
    """Weights ``w (P,)`` float64 (summing to 1) of the prefixes in a key average.

    ``"per_type"`` (``memit/compute_ks.py``): the bare prompt ``"{}"`` and the generated
    prefixes are two types; each type weighs 1/(number of types present) and shares it
    equally among its members, so with one bare and five generated prefixes the bare prompt
    weighs ½ and each generated one 1/10; a chat context prefix (``chat_prefix``) is one more
    non-bare prefix, so the bare prompt keeps ½. ``"uniform"``: ``1/P`` each (ROME ``compute_u``).
    """
    return row_weights(prefixes, 0, average)


def row_weights(prefixes, n_rewordings: int = 0, average: str = "per_type") -> torch.Tensor:
    """Weights ``(P + k,)`` float64 (summing to 1) of one request's key rows: its ``P``
    prefix rows, then its ``k = n_rewordings`` rewording rows; with ``k = 0``,
    :func:`prefix_weights`. ``"per_type"``: the rewordings are one more type beside the bare
    prompt and the generated prefixes; ``"uniform"``: ``1/(P + k)`` each.
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if n_rewordings < 0:
        raise ValueError(f"n_rewordings must be >= 0, got {n_rewordings!r}")
    prefixes = check_prefixes(prefixes)
    kinds = ["bare" if p == SUBJECT_SLOT else "prefix" for p in prefixes] + ["rewording"] * n_rewordings
    if average == "uniform":
        return torch.full((len(kinds),), 1.0 / len(kinds), dtype=torch.float64)
    present = set(kinds)
    return torch.tensor([1.0 / (len(present) * kinds.count(kind)) for kind in kinds], dtype=torch.float64)


def compute_keys(lm, layer: int, requests, prefixes, *, average: str = "per_type",
                 batch_size: int = DEFAULT_BATCH_SIZE, reader: BatchKeys | None = None,
                 paraphrases: list[list[str]] | None = None) -> torch.Tensor:
    """The keys ``K (d_k, u)`` float32 of ``requests`` at block ``layer``.

    Args:
        lm: the loaded model.
        layer: the block whose down projection is edited.
        requests: the batch's :class:`~rlsedit.requests.EditRequest` objects (``u`` of them).
        prefixes: context prefixes, each with one ``{}`` for the prompt
            (:func:`~rlsedit.locate.prefixes.context_prefixes`).
        average: ``"per_type"`` (MEMIT/AlphaEdit/RLSEdit) or ``"uniform"`` (ROME), see
            :func:`prefix_weights`.
        batch_size: sequences per forward pass; every request × prefix text runs in
            length-sorted, right-padded batches and the forward stops at the down projection.
        reader: a :class:`BatchKeys` made for the same model, requests, prefixes, average and
            rewordings; the keys then come from its cached states (``batch_size`` is its own).
            Editors pass one, so every key of a batch still goes through this function.
        paraphrases: per request, prompt templates (``"{}"`` for the subject) whose rows join
            the average (:func:`row_weights`); None = the prefixes only.

    Raises:
        InvalidRequestError: a subject missing from its prompt, a text longer than the
            model's context, a bad layer or prefix, a reader made for other requests.
        NumericalError: the model produced non-finite keys.
    """
    if reader is not None:
        reader.check_made_for(lm, requests, prefixes, average, paraphrases)
        return reader.keys(layer)
    layer = check_layer(lm, layer)
    prefixes = check_prefixes(prefixes)
    requests = list(requests)
    texts = prompt_texts(requests, prefixes, paraphrases)
    weights = row_weights(prefixes, _rewordings_per_request(paraphrases), average)
    _check_batch_size(batch_size)
    module = down_proj(lm, layer)
    ids, positions = encode_through_subject(lm, texts)
    rows = torch.empty((len(ids), lm.d_k), dtype=torch.float32, device=lm.device)  # (u·P, d_k)
    for chunk, input_ids, attention_mask in _padded_chunks(lm, ids, batch_size):
        keys_in = read_module(lm, module, input_ids, attention_mask, read="input")  # (b, L, d_k)
        _gather_at_subject(rows, keys_in, chunk, positions)
    return _average_keys(lm, layer, rows, weights, requests)


def _rewordings_per_request(paraphrases: list[list[str]] | None) -> int:
    """Rewording rows per request (``prompt_texts`` has checked they are equal in number)."""
    return len(paraphrases[0]) if paraphrases else 0


def _as_lists(paraphrases) -> list[list[str]] | None:
    """Rewordings in one comparable form (lists of lists), None kept."""
    return None if paraphrases is None else [list(t) for t in paraphrases]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


def _padded_chunks(lm, ids: list[list[int]], batch_size: int):
    """``(row indices, input_ids, attention_mask)`` per length-sorted, right-padded chunk."""
    for chunk in length_sorted_chunks([len(s) for s in ids], batch_size):
        input_ids, attention_mask = pad_right([ids[i] for i in chunk], pad_id(lm), lm.device)
        yield chunk, input_ids, attention_mask


def _gather_at_subject(out: torch.Tensor, states: torch.Tensor, chunk: list[int], positions: list[int]) -> None:
    """``out[chunk[r]] = states[r, positions[chunk[r]]]`` (float32) for every row ``r`` of a chunk."""
    device = out.device
    pos = torch.tensor([positions[i] for i in chunk], device=device)
    out[torch.tensor(chunk, device=device)] = states[torch.arange(len(chunk), device=device), pos].float()


def _average_keys(lm, layer: int, rows: torch.Tensor, weights: torch.Tensor, requests: list) -> torch.Tensor:
    """``K (d_k, u)``: ``k_i = Σ_p w_p · row_{i,p}`` of the request-major rows ``(u·P, d_k)``."""
    u, P = len(requests), len(weights)
    w = weights.to(device=rows.device, dtype=torch.float32)
    K = torch.einsum("p,upd->ud", w, rows.view(u, P, lm.d_k)).T.contiguous()  # (u, P, d_k) -> (d_k, u)
    if not torch.isfinite(K).all():
        bad = [requests[i].id for i in torch.nonzero(~torch.isfinite(K).all(dim=0)).flatten().tolist()]
        raise NumericalError(f"layer {layer}: non-finite keys for edits {bad}")
    return K


@dataclass
class _Chunk:
    """Rows run together: their indices among the batch's texts, and their state entering
    the reader's current block with the arguments of blocks ``first..top``."""

    rows: list[int]
    state: torch.Tensor  # (b, L, d_model)
    calls: BlockCalls


class _KeptStates:
    """Token sequences run once from the embedding to the state entering block ``first`` and
    kept with the arguments of blocks ``first..top``; :meth:`_advance` carries them up through
    blocks with their present weights (the readers below share this)."""

    lm: object
    first: int
    top: int

    def _keep_states(self, ids: list[list[int]], batch_size: int) -> None:
        self.current = self.first  # the block the kept states enter next
        self._chunks = []
        for chunk, input_ids, attention_mask in _padded_chunks(self.lm, ids, batch_size):
            state, calls = capture_entering(self.lm, self.first, self.top, input_ids, attention_mask)
            self._chunks.append(_Chunk(rows=chunk, state=state, calls=calls))

    def _advance(self, layer: int) -> None:
        """Carry the kept states through blocks ``current..layer-1``."""
        layer = check_layer(self.lm, layer)
        if layer < self.current:
            raise UnsupportedError(
                f"the batch's keys were read up to block {self.current}; block {layer} is below it "
                "(a reader only goes up: make a new one)")
        if layer > self.top:
            raise InvalidRequestError(f"layer {layer} is above this reader's top layer {self.top}")
        with torch.no_grad():
            for chunk in self._chunks:
                chunk.state = run_blocks(self.lm, chunk.state, chunk.calls, self.current, layer)
        self.current = layer


class BatchKeys(_KeptStates):
    """The keys of one batch at the edited layers ``first ≤ l ≤ top``, in ascending order, with
    the weights as they are when each is asked for.

    Made once per batch: every request × prefix text is tokenized and chunked as
    :func:`compute_keys` does and runs once from the embedding to the state entering block
    ``first``, which is kept with the arguments the model passes to blocks ``first..top``
    (:func:`~rlsedit.locate.forward.capture_entering`). :meth:`keys` at ``l`` then carries the
    kept states through blocks ``current..l-1`` with their present weights (so the layers
    written since are seen, exactly as a fresh :func:`compute_keys` would see them) and reads
    block ``l``'s down-projection input; a later layer continues from there.

    Exact while nothing below the current block changes after it was passed: an editor
    writes layer ``l`` only after reading its keys, and nothing below ``l`` afterwards.
    Memory: the kept states, ``u·(P + k)`` rows × their length × ``d_model`` (``k`` rewordings).
    """

    def __init__(self, lm, first: int, top: int, requests, prefixes, *, average: str = "per_type",
                 batch_size: int = DEFAULT_BATCH_SIZE, paraphrases: list[list[str]] | None = None):
        first, top = check_layer(lm, first), check_layer(lm, top)
        if top < first:
            raise InvalidRequestError(f"top layer {top} is below the first layer {first}")
        self.lm, self.first, self.top = lm, first, top
        self.prefixes = check_prefixes(prefixes)
        self.average = average
        _check_batch_size(batch_size)
        self.requests = list(requests)
        texts = prompt_texts(self.requests, self.prefixes, paraphrases)
        self.paraphrases = _as_lists(paraphrases)
        self.weights = row_weights(self.prefixes, _rewordings_per_request(paraphrases), average)
        self.rows_per_request = len(self.weights)
        ids, self.positions = encode_through_subject(lm, texts)
        self._keep_states(ids, batch_size)

    def check_made_for(self, lm, requests, prefixes, average: str, paraphrases=None) -> None:
        """Refuse a call about other requests, prefixes, averaging, rewordings or another model."""
        if lm is not self.lm or list(prefixes) != self.prefixes or average != self.average \
                or [r.id for r in requests] != [r.id for r in self.requests] \
                or _as_lists(paraphrases) != self.paraphrases:
            raise InvalidRequestError(
                "the BatchKeys reader was made for another model, batch, prefixes, average or rewordings")

    def keys(self, layer: int) -> torch.Tensor:
        """``K (d_k, u)`` float32 at block ``layer`` (≥ every layer asked before), as
        :func:`compute_keys` gives it on the model as it is now."""
        self._advance(layer)
        module = down_proj(self.lm, layer)
        rows = torch.empty((len(self.positions), self.lm.d_k), dtype=torch.float32, device=self.lm.device)
        for chunk in self._chunks:
            keys_in = read_in_block(self.lm, chunk.state, chunk.calls, layer, module, read="input")  # (b, L, d_k)
            _gather_at_subject(rows, keys_in, chunk.rows, self.positions)
        return _average_keys(self.lm, layer, rows, self.weights, self.requests)

    def hidden_at_top(self) -> torch.Tensor:
        """The residual stream after block ``top`` at the subject's last token of each bare
        prompt, ``(u, d_model)`` float32, as ``hidden_at_subject(lm, top, requests)`` gives it
        now: from the kept bare-prompt rows when ``"{}"`` is a prefix, else by that function."""
        if SUBJECT_SLOT not in self.prefixes:
            return hidden_at_subject(self.lm, self.top, self.requests)
        P, bare = self.rows_per_request, self.prefixes.index(SUBJECT_SLOT)
        out = torch.empty((len(self.requests), self.lm.d_model), dtype=torch.float32, device=self.lm.device)
        positions = self.positions[bare::P]  # request i's bare row is i·P + bare
        with torch.no_grad():
            for chunk in self._chunks:
                picked = [r for r, row in enumerate(chunk.rows) if row % P == bare]
                if not picked:
                    continue
                index = torch.tensor(picked, device=chunk.state.device)
                state = run_blocks(self.lm, chunk.state.index_select(0, index), select_rows(chunk.calls, index),
                                   self.current, self.top + 1)  # (b', L, d_model)
                _gather_at_subject(out, state, [chunk.rows[r] // P for r in picked], positions)
        return out


class PromptKeys(_KeptStates):
    """Keys at *every* token position of the bare prompts of ``requests`` (the subject filled
    in, the whole prompt): ``width`` columns per prompt, its last ``width`` positions in order,
    zero columns in front when it is shorter, so each prompt owns the same number of columns.

    A down projection is applied at every position, and a prompt's later tokens read the
    earlier positions' outputs through attention; keys there are what rows that keep a
    prompt's whole forward pass in place need (:mod:`~rlsedit.locate.preserve`). Read as
    :class:`BatchKeys` reads: each block once, after the layers below it were written.
    """

    def __init__(self, lm, first: int, top: int, requests, width: int, *,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        first, top = check_layer(lm, first), check_layer(lm, top)
        if top < first:
            raise InvalidRequestError(f"top layer {top} is below the first layer {first}")
        if width < 1:
            raise InvalidRequestError(f"width must be >= 1 positions, got {width!r}")
        _check_batch_size(batch_size)
        self.lm, self.first, self.top, self.width = lm, first, top, width
        self.requests = list(requests)
        ids, _ = encode_at_subject(lm, prompt_texts(self.requests, [SUBJECT_SLOT]))
        self.lengths = [len(seq) for seq in ids]
        self._keep_states(ids, batch_size)

    def keys(self, layer: int) -> torch.Tensor:
        """``(d_k, n·width)`` float32 at block ``layer`` (≥ every layer asked before): prompt
        ``i``'s columns ``i·width .. (i+1)·width − 1``, its positions ``L_i − width .. L_i − 1``
        (zero columns for the negative ones)."""
        self._advance(layer)
        module = down_proj(self.lm, layer)
        w = self.width
        out = torch.zeros((len(self.lengths), w, self.lm.d_k), dtype=torch.float32, device=self.lm.device)
        for chunk in self._chunks:
            keys_in = read_in_block(self.lm, chunk.state, chunk.calls, layer, module, read="input")  # (b, L, d_k)
            for r, i in enumerate(chunk.rows):  # right-padded: prompt i's tokens are 0..L_i-1
                n = min(w, self.lengths[i])
                out[i, w - n:] = keys_in[r, self.lengths[i] - n:self.lengths[i]].float()
        if not torch.isfinite(out).all():
            raise NumericalError(f"layer {layer}: non-finite keys in the prompts' positions")
        return out.reshape(-1, self.lm.d_k).T.contiguous()
