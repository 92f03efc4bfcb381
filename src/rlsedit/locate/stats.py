"""Corpus second moments of the edited layers' keys: ``E[k kᵀ]`` over a text corpus.

For each requested layer ``l`` the key ``k ∈ R^{d_k}`` is the input of block ``l``'s MLP down
projection at one token. Over the first ``max_tokens`` non-padding tokens of a corpus,

    mom_l = E[k kᵀ] = (1/n) Σ_t k_t k_tᵀ        (d_k, d_k), uncentered, float64

which is MEMIT's ``SecondMoment.moment()`` (``rome/layer_stats.py`` collects ``mom2``: the sum
``Σ k kᵀ`` and ``count = n``; ``moment() = mom2 / count``). Editors use the anchor Gram
``A = K_0 K_0ᵀ = n · E[k kᵀ]`` (:meth:`SecondMoment.gram`).

Differences from MEMIT's collector, on purpose:

* the budget counts tokens (``max_tokens``), not documents (MEMIT's ``sample_size=100000``
  is a number of Wikipedia articles, each truncated to the context length);
* documents are read in file order and cut into ``seq_len`` pieces (each piece starts with
  the tokenizer's own prefix, e.g. ``<bos>``, as a prompt would), so nothing past the first
  ``seq_len`` tokens of a long article is thrown away;
* every requested layer is collected in one pass, and the forward stops right after the
  highest requested layer's down projection has seen its input (the rest of the network and
  the LM head are never run).

Results are cached on disk per layer (``<cache_dir>/stats/<key>.safetensors`` + ``.json``).
The key covers what determines the statistic: the model's fingerprint, the sha256 of every
weight upstream of the layer's keys (so statistics of an edited model never pose as the
original's), the layer, the corpus sha256, ``max_tokens``, ``seq_len`` and the format version.
A process that has to compute holds a lock on the cache folder meanwhile; others that want
missing entries wait for it and then read what it wrote.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .. import __version__
from ..errors import InvalidRequestError, NumericalError
from ..model.hooks import capture
from ..model.load import default_cache_dir
from ..model.weights import down_proj
from ..filelock import StateLock
from .corpus import corpus_digest, iter_corpus_texts
from .moment import SecondMoment
from .stats_cache import cache_key, read_cached, upstream_sha256, write_cached

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1
DEFAULT_MAX_TOKENS = 100_000
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_SEQ_LEN = 512
# How the sums are formed; recorded in every cache entry. Each batch's float32 keys are cast
# to float64 before the GEMM: a float32 sum's error bounds the eigenvalues' error in absolute
# terms (Weyl, |Δλ| ≤ ‖ΔM‖₂), so relative to λ_min it grows with the condition number, and the
# keys of larger models are far worse conditioned. The cost is paid once (the result is
# cached); benchmarks/stats/README.md has both measured.
ACCUMULATION = "float64 GEMM of float32 keys, float64 sum"


@dataclass(frozen=True)
class MomentResult:
    """One layer's statistic and where it came from (what ``rlsedit stats`` reports).

    Attributes:
        moment: the statistic.
        cached: True when it was read from the disk cache.
        seconds: time to read it (cache hit) or of the pass that computed it (shared by all
            layers computed in that pass).
        path: the cache file, or None when caching was off.
    """

    moment: SecondMoment
    cached: bool
    seconds: float
    path: Path | None


class _StopForward(Exception):
    """Raised by a hook once the highest requested layer has been read: the rest is not needed."""


# --------------------------------------------------------------------------------------------
# corpus tokens


def _token_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (``[<bos>]`` for Gemma/Llama 3, ``[]`` for GPT-2).

    Each piece starts with them, as every prompt the editors read does. A trailing ``<eos>``
    some tokenizers also add is not part of a prefix and is dropped.
    """
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    eos, bos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)
    if ids and eos is not None and eos != bos and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def iter_token_pieces(tokenizer, corpus, *, seq_len: int, max_tokens: int) -> Iterator[list[int]]:
    """Token pieces of at most ``seq_len`` ids, ``max_tokens`` ids in all (the last one cut)."""
    prefix = _token_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise InvalidRequestError(f"seq_len={seq_len} leaves no room after the tokenizer's prefix {prefix}")
    left = max_tokens
    for text in iter_corpus_texts(corpus):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = prefix + list(ids[start:start + body])
            piece = piece[:left]
            yield piece
            left -= len(piece)
            if left == 0:
                return


def _batches(pieces: Iterator[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Group pieces so that ``len(batch) · longest ≤ batch_tokens`` (padded tokens included)."""
    batch: list[list[int]] = []
    longest = 0
    for piece in pieces:
        longer = max(longest, len(piece))
        if batch and (len(batch) + 1) * longer > batch_tokens:
            yield batch
            batch, longer = [], len(piece)
        batch.append(piece)
        longest = longer
    if batch:
        yield batch


def _read_into(results: dict, layer: int, entry: tuple[Path, Path, dict], d_k: int) -> None:
    """Put ``layer``'s cache entry into ``results`` if there is a valid one."""
    tensor_path, meta_path, fields = entry
    start = time.perf_counter()
    hit = read_cached(tensor_path, meta_path, fields, d_k)
    if hit is not None:
        log.info("layer %d: second moment read from %s", layer, tensor_path)
        results[layer] = MomentResult(hit, True, time.perf_counter() - start, tensor_path)


# --------------------------------------------------------------------------------------------
# computation


def _context_length(lm) -> int | None:
    config = lm.model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return None if context is None else int(context)


def _resolve_seq_len(lm, seq_len: int | None) -> int:
    """``seq_len``, or by default ``DEFAULT_SEQ_LEN`` capped at the model's context length."""
    if seq_len is not None:
        return seq_len
    context = _context_length(lm)
    return DEFAULT_SEQ_LEN if context is None else min(DEFAULT_SEQ_LEN, context)


def _check_arguments(lm, layers, max_tokens, batch_tokens, seq_len) -> list[int]:
    layers = list(layers)
    if not layers:
        raise InvalidRequestError("no layers requested; give at least one layer index")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
            raise InvalidRequestError(
                f"layer {layer!r} is not a block index of this model (0..{lm.n_layers - 1})"
            )
    for name, value, low in (("max_tokens", max_tokens, 1), ("batch_tokens", batch_tokens, 1),
                             ("seq_len", seq_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}")
    if seq_len > batch_tokens:
        raise InvalidRequestError(
            f"seq_len={seq_len} exceeds batch_tokens={batch_tokens}: a batch must fit one piece"
        )
    context = _context_length(lm)
    if context is not None and seq_len > context:
        raise InvalidRequestError(f"seq_len={seq_len} exceeds the model's context length {context}")
    return sorted(set(layers))


@torch.inference_mode()
def _accumulate(lm, layers: list[int], corpus, *, max_tokens: int, batch_tokens: int,
                seq_len: int, progress: bool) -> dict[int, SecondMoment]:
    """One pass over the corpus: ``S_l = Σ_t k_t k_tᵀ`` for every layer, then ``S_l / n``."""
    from tqdm.auto import tqdm

    tokenizer = lm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = lm.device
    d_k = lm.d_k
    sums = {l: torch.zeros(d_k, d_k, dtype=torch.float64, device=device) for l in layers}
    count = 0
    top = down_proj(lm, max(layers))

    def stop(_module, _args, _output):
        raise _StopForward

    pieces = iter_token_pieces(tokenizer, corpus, seq_len=seq_len, max_tokens=max_tokens)
    bar = tqdm(total=max_tokens, unit="tok", desc="second moments", disable=not progress)
    try:
        for batch in _batches(pieces, batch_tokens):
            longest = max(len(p) for p in batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, piece in enumerate(batch):  # right padding: positions stay 0..len-1
                ids[row, :len(piece)] = torch.tensor(piece, dtype=torch.long)
                mask[row, :len(piece)] = 1
            ids, mask = ids.to(device), mask.to(device)
            keep = mask.reshape(-1).bool()  # (batch·longest,) the non-padding tokens
            with ExitStack() as stack:
                seen = {l: stack.enter_context(capture(down_proj(lm, l))) for l in layers}
                # Registered after the captures, so it runs after they have read their input.
                handle = top.register_forward_hook(stop)
                stack.callback(handle.remove)
                try:
                    lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                for layer in layers:
                    assert len(seen[layer]) == 1, f"layer {layer}: {len(seen[layer])} captures"
                    # K: (tokens, d_k), padding rows dropped
                    K = seen[layer][0].reshape(-1, d_k)[keep].to(torch.float64)
                    # S_l += Kᵀ K = Σ_t k_t k_tᵀ   (d_k, d_k)
                    sums[layer].addmm_(K.T, K)
            n = int(keep.sum())
            count += n
            bar.update(n)
    finally:
        bar.close()
    if count == 0:
        raise InvalidRequestError("the corpus holds no text to compute statistics on")
    if count < max_tokens:
        log.warning("the corpus ran out after %d tokens (max_tokens=%d)", count, max_tokens)
    out = {}
    for layer in layers:
        S = sums[layer].to("cpu")
        # A non-finite entry k_ti makes S_ii = Σ_t k_ti² non-finite, so checking S once is enough.
        if not torch.isfinite(S).all():
            raise NumericalError(
                f"layer {layer}: the model produced non-finite keys on the corpus; "
                "no statistics were written"
            )
        # E[kkᵀ] = S / n, symmetrised: the GEMM's rounding is not exactly symmetric.
        mom = (S + S.T) / (2 * count)
        out[layer] = SecondMoment(mom=mom.contiguous(), count=count)
    return out


def collect_second_moments(
    lm,
    layers: Sequence[int],
    corpus: str | Path | Sequence[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seq_len: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> dict[int, MomentResult]:
    """:func:`second_moments` with, per layer, whether it came from the cache and how long it took."""
    seq_len = _resolve_seq_len(lm, seq_len)
    wanted = _check_arguments(lm, layers, max_tokens, batch_tokens, seq_len)
    corpus_sha, corpus_label = corpus_digest(corpus)
    results: dict[int, MomentResult] = {}
    paths: dict[int, tuple[Path, Path, dict]] = {}
    if use_cache:
        root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "stats"
        upstream = upstream_sha256(lm, wanted)
        for layer in wanted:
            fields = {
                "version": STATS_FORMAT_VERSION,
                "model_fingerprint": lm.fingerprint,
                "upstream_weights_sha256": upstream[layer],
                "layer": layer,
                "corpus_sha256": corpus_sha,
                "max_tokens": max_tokens,
                "seq_len": seq_len,
                "dtype": "float64",
                "accumulation": ACCUMULATION,
            }
            key = cache_key(fields)
            tensor_path, meta_path = root / f"{key}.safetensors", root / f"{key}.json"
            paths[layer] = (tensor_path, meta_path, fields)
            _read_into(results, layer, paths[layer], lm.d_k)
    missing = [l for l in wanted if l not in results]
    if not missing:
        return {layer: results[layer] for layer in wanted}

    def compute(layers: list[int]) -> None:
        start = time.perf_counter()
        computed = _accumulate(lm, layers, corpus, max_tokens=max_tokens,
                               batch_tokens=batch_tokens, seq_len=seq_len, progress=progress)
        seconds = time.perf_counter() - start
        log.info("layers %s: %d tokens in %.1f s", layers, computed[layers[0]].count, seconds)
        for layer in layers:
            path = None
            if use_cache:
                tensor_path, meta_path, fields = paths[layer]
                extra = {"model_spec": lm.spec, "model_name": lm.name, "corpus": corpus_label,
                         "batch_tokens": batch_tokens, "seconds": round(seconds, 3),
                         "rlsedit_version": __version__}
                write_cached(tensor_path, meta_path, fields, computed[layer], extra)
                path = tensor_path
            results[layer] = MomentResult(computed[layer], False, seconds, path)

    if not use_cache:
        compute(missing)
    else:
        # One process computes, the others wait and read: processes started together (one
        # benchmark method each) would otherwise all pay for the same corpus pass.
        root.mkdir(parents=True, exist_ok=True)
        with StateLock(root, wait=True):
            for layer in missing:
                _read_into(results, layer, paths[layer], lm.d_k)
            still_missing = [l for l in missing if l not in results]
            if still_missing:
                compute(still_missing)
    return {layer: results[layer] for layer in wanted}


def second_moments(
    lm,
    layers: Sequence[int],
    corpus: str | Path | Sequence[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seq_len: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> dict[int, SecondMoment]:
    """``{layer: E[k kᵀ]}`` of the down-projection input over a corpus, cached on disk.

    ``mom_l = (1/n) Σ_t k_t k_tᵀ`` over the first ``n = min(max_tokens, corpus tokens)``
    non-padding tokens, every requested layer in one forward pass per batch.

    Args:
        lm: a :class:`~rlsedit.model.load.LoadedModel`.
        layers: block indices.
        corpus: a ``.jsonl`` file (``"text"`` field), a plain-text file, or a list of texts.
        max_tokens: token budget ``n`` (MEMIT's budget is 100000 *documents*; see module doc).
        batch_tokens: cap on padded tokens per forward (bounds memory; independent of the
            model's context length).
        seq_len: length of the pieces documents are cut into (≤ the context length; default
            ``DEFAULT_SEQ_LEN`` or the context length if shorter).
        cache_dir: cache root (default :func:`~rlsedit.model.load.default_cache_dir`); entries
            go to ``<cache_dir>/stats/``.
        use_cache: read and write the disk cache.
        progress: show a tqdm bar.
    """
    found = collect_second_moments(lm, layers, corpus, max_tokens=max_tokens,
                                   batch_tokens=batch_tokens, seq_len=seq_len,
                                   cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    return {layer: result.moment for layer, result in found.items()}
