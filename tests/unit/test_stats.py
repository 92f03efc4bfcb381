"""second_moments on tiny random models: the statistic, the budget, the single pass, the cache."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rlsedit.errors import InvalidRequestError, NumericalError
from rlsedit.locate.corpus import iter_corpus_texts
from rlsedit.locate.moment import SecondMoment, spectrum_summary
from rlsedit.locate.stats import collect_second_moments, iter_token_pieces, second_moments
from rlsedit.model.hooks import capture
from rlsedit.model.load import LoadedModel
from rlsedit.model.weights import block, down_proj, get_W, set_W
from tiny_models import WORD_SPECIALS, loaded, tiny_model, word_tokenizer

WORDS = ("the a of is in and to was by for on with as at from capital city river north south "
         "king queen born died music film war paris london rome france italy england").split()
N_LAYERS = 4


def tiny_tokenizer(*, bos: bool) -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, bos=bos)  # bos like Gemma / Llama 3: every encoding starts with <s>


def tiny_lm(family: str = "llama", *, bos: bool = False, seed: int = 0) -> LoadedModel:
    extra = {"gemma3_text": {"sliding_window": 8}}.get(family, {})
    model = tiny_model(family, vocab=len(WORD_SPECIALS) + len(WORDS), seed=seed, d_model=16, d_mlp=24,
                       n_layers=N_LAYERS, n_heads=2, n_kv_heads=1, max_positions=64, frozen=True, **extra)
    return loaded(model, tiny_tokenizer(bos=bos), family, fingerprint=f"{family}-{seed}".ljust(64, "0"))


def make_corpus(n_docs: int = 6, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n_docs)]


def reference_moments(lm, layers, corpus, *, seq_len, max_tokens):
    """Each piece alone (no padding, no batching, no early stop), the model in float64: KᵀK / n."""
    model = lm.model.to(torch.float64)
    keys = {l: [] for l in layers}
    try:
        for piece in iter_token_pieces(lm.tokenizer, corpus, seq_len=seq_len, max_tokens=max_tokens):
            for layer in layers:
                with capture(down_proj(lm, layer)) as seen, torch.no_grad():
                    model(input_ids=torch.tensor([piece]))
                keys[layer].append(seen[0][0])
    finally:
        model.to(torch.float32)
    out = {}
    for layer in layers:
        K = torch.cat(keys[layer])  # (n, d_k) float64
        out[layer] = SecondMoment(mom=K.T @ K / K.shape[0], count=K.shape[0])
    return out


def assert_close_moments(got: SecondMoment, want: SecondMoment, rtol: float):
    assert got.count == want.count
    scale = want.mom.abs().max()
    assert float((got.mom - want.mom).abs().max() / scale) < rtol


# ------------------------------------------------------------------------------------ pieces


def test_pieces_respect_seq_len_prefix_and_order():
    tok = tiny_tokenizer(bos=True)
    docs = ["the city of rome is in italy and the city of paris is in france",  # 15 words
            "a king was born"]
    pieces = list(iter_token_pieces(tok, docs, seq_len=6, max_tokens=1000))
    assert [len(p) for p in pieces] == [6, 6, 6, 5]
    assert all(p[0] == tok.bos_token_id for p in pieces)  # each piece starts like a prompt
    body = [i for p in pieces for i in p[1:]]
    expected = [i for d in docs for i in tok(d, add_special_tokens=False).input_ids]
    assert body == expected  # nothing lost, nothing repeated, file order


def test_pieces_stop_exactly_at_the_budget():
    tok = tiny_tokenizer(bos=False)
    docs = make_corpus()
    total = sum(len(tok(d).input_ids) for d in docs)
    for budget in (1, 7, 40, total - 1, total, total + 50):
        pieces = list(iter_token_pieces(tok, docs, seq_len=9, max_tokens=budget))
        assert sum(map(len, pieces)) == min(budget, total)
        assert all(1 <= len(p) <= 9 for p in pieces)


def test_corpus_formats_agree(tmp_path):
    docs = make_corpus(4)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"title": str(i), "text": d}) for i, d in enumerate(docs)) + "\n\n")
    plain = tmp_path / "c.txt"
    plain.write_text("\n\n".join(docs) + "\n")
    assert list(iter_corpus_texts(jsonl)) == docs
    assert [t.strip() for t in iter_corpus_texts(plain)] == docs
    assert list(iter_corpus_texts(docs)) == docs


# ------------------------------------------------------------------------------ the statistic


@pytest.mark.parametrize("family,bos", [("llama", False), ("llama", True), ("gpt2", False),
                                        ("gemma3_text", True)])
def test_matches_the_float64_reference(family, bos):
    """float32 forward + float64 sums vs a float64 model on unbatched pieces: ≤ 1e-5 relative."""
    lm = tiny_lm(family, bos=bos)
    corpus = make_corpus()
    layers = [0, 2]
    got = second_moments(lm, layers, corpus, max_tokens=10_000, batch_tokens=40, seq_len=16,
                         use_cache=False)
    want = reference_moments(lm, layers, corpus, seq_len=16, max_tokens=10_000)
    assert list(got) == layers
    for layer in layers:
        m = got[layer]
        assert m.mom.dtype == torch.float64 and m.mom.shape == (24, 24)
        assert torch.equal(m.mom, m.mom.T)
        assert float(torch.linalg.eigvalsh(m.mom)[0]) > -1e-12
        assert_close_moments(m, want[layer], rtol=1e-5)
        torch.testing.assert_close(m.gram(), m.mom * m.count)


def test_budget_counts_tokens_exactly():
    lm = tiny_lm()
    corpus = make_corpus()
    got = second_moments(lm, [1], corpus, max_tokens=37, batch_tokens=32, seq_len=8, use_cache=False)
    want = reference_moments(lm, [1], corpus, seq_len=8, max_tokens=37)
    assert got[1].count == 37
    assert_close_moments(got[1], want[1], rtol=1e-5)


def test_padding_and_batching_do_not_change_the_statistic():
    lm = tiny_lm()
    corpus = make_corpus(8)
    runs = [second_moments(lm, [3], corpus, max_tokens=10_000, batch_tokens=bt, seq_len=12,
                           use_cache=False)[3] for bt in (12, 30, 100, 1000)]
    for other in runs[1:]:
        assert_close_moments(other, runs[0], rtol=1e-6)


def test_one_pass_stops_after_the_highest_layer():
    lm = tiny_lm()
    calls = {"later_block": 0, "lm_head": 0, "forward": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    handles = [block(lm, 3).register_forward_hook(count("later_block")),
               lm.model.lm_head.register_forward_hook(count("lm_head")),
               lm.model.register_forward_pre_hook(count("forward"))]
    try:
        got = second_moments(lm, [2, 0, 1], make_corpus(), max_tokens=10_000, batch_tokens=64,
                             seq_len=16, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert list(got) == [0, 1, 2]  # sorted, all filled in by the same passes
    assert calls["later_block"] == 0 and calls["lm_head"] == 0
    pieces = list(iter_token_pieces(lm.tokenizer, make_corpus(), seq_len=16, max_tokens=10_000))
    assert calls["forward"] < len(pieces)  # pieces were batched
    # and no hook survives the exceptions used to stop early
    assert all(not down_proj(lm, l)._forward_hooks for l in range(N_LAYERS))


def test_non_finite_keys_are_refused_and_not_cached(tmp_path):
    lm = tiny_lm()
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[0, :] = float("inf")
    with pytest.raises(NumericalError, match="layer 1: the model produced non-finite keys"):
        second_moments(lm, [1], make_corpus(), max_tokens=100, seq_len=8, batch_tokens=32,
                       cache_dir=tmp_path)
    assert not list((tmp_path / "stats").glob("*.safetensors"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(layers=[]), "no layers requested"),
    (dict(layers=[4]), r"layer 4 is not a block index of this model \(0..3\)"),
    (dict(layers=[-1]), "layer -1 is not a block index"),
    (dict(layers=[True]), "is not a block index"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(seq_len=1), "seq_len must be an integer >= 2"),
    (dict(seq_len=32, batch_tokens=16), "seq_len=32 exceeds batch_tokens=16"),
    (dict(seq_len=65, batch_tokens=4096), "exceeds the model's context length 64"),
])
def test_bad_arguments(kwargs, message):
    args = dict(layers=[0], max_tokens=10, seq_len=8, batch_tokens=32)
    args.update(kwargs)
    layers = args.pop("layers")
    with pytest.raises(InvalidRequestError, match=message):
        second_moments(tiny_lm(), layers, make_corpus(), use_cache=False, **args)


def test_bad_corpora(tmp_path):
    lm = tiny_lm()
    run = lambda corpus: second_moments(lm, [0], corpus, max_tokens=10, seq_len=8, batch_tokens=32,
                                        use_cache=False)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        run(tmp_path / "missing.jsonl")
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "the city"}\n{"body": "the city"}\n')
    with pytest.raises(InvalidRequestError, match=r"no_text.jsonl:2: expected a JSON object with a string \"text\""):
        run(no_text)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "the city"\n')
    with pytest.raises(InvalidRequestError, match="broken.jsonl:1: not valid JSON"):
        run(broken)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(InvalidRequestError, match="holds no text"):
        run(empty)
    with pytest.raises(InvalidRequestError, match="strings only"):
        run(["the city", 3])


def test_spectrum_summary():
    s = spectrum_summary(SecondMoment(mom=torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), count=9))
    assert s["trace"] == 5.0 and s["rank"] == 2 and s["condition"] == pytest.approx(4.0)
    assert s["count"] == 9
    singular = spectrum_summary(SecondMoment(mom=torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)), count=3))
    assert singular["rank"] == 2 and singular["condition"] == float("inf")


# ---------------------------------------------------------------------------------- the cache


def stats_files(cache_dir):
    from rlsedit.filelock import LOCK_FILE_NAME

    return sorted(p.name for p in (cache_dir / "stats").iterdir() if p.name != LOCK_FILE_NAME)


def test_cache_hit_returns_identical_tensors_without_a_forward(tmp_path):
    lm = tiny_lm()
    corpus = make_corpus()
    first = second_moments(lm, [0, 2], corpus, max_tokens=100, seq_len=8, batch_tokens=32, cache_dir=tmp_path)
    files = stats_files(tmp_path)
    assert len(files) == 4 and not [f for f in files if f.endswith(".tmp")]

    def no_forward(*_args, **_kwargs):
        raise AssertionError("a cache hit must not run the model")

    lm.model.forward = no_forward
    again = collect_second_moments(lm, [0, 2], corpus, max_tokens=100, seq_len=8, batch_tokens=32,
                                   cache_dir=tmp_path)
    for layer in (0, 2):
        assert again[layer].cached
        assert torch.equal(again[layer].moment.mom, first[layer].mom)
        assert again[layer].moment.count == first[layer].count == 100
    assert stats_files(tmp_path) == files


def test_cache_metadata(tmp_path):
    lm = tiny_lm()
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("\n".join(json.dumps({"text": d}) for d in make_corpus()))
    result = collect_second_moments(lm, [1], corpus_file, max_tokens=50, seq_len=8, batch_tokens=32,
                                    cache_dir=tmp_path / "cache")[1]
    assert not result.cached and result.path.parent == tmp_path / "cache" / "stats"
    meta = json.loads(result.path.with_suffix(".json").read_text())
    assert meta["corpus_sha256"] == hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    assert meta["model_fingerprint"] == lm.fingerprint
    assert (meta["layer"], meta["count"], meta["max_tokens"], meta["seq_len"]) == (1, 50, 50, 8)
    assert meta["dtype"] == "float64" and meta["version"] == 1 and meta["shape"] == [24, 24]
    assert len(meta["upstream_weights_sha256"]) == 64 and "accumulation" in meta


def test_changed_requests_recompute(tmp_path):
    lm = tiny_lm()
    corpus = make_corpus()
    base = dict(max_tokens=100, seq_len=8, batch_tokens=32, cache_dir=tmp_path)
    reference = second_moments(lm, [1], corpus, **base)[1]
    n_files = len(stats_files(tmp_path))
    for change in (dict(corpus=make_corpus(seed=1)), dict(max_tokens=101), dict(seq_len=9)):
        args = {**base, "corpus": corpus, **change}
        result = collect_second_moments(lm, [1], args.pop("corpus"), **args)[1]
        assert not result.cached, change
        n_files += 2
        assert len(stats_files(tmp_path)) == n_files
    # batch_tokens only changes rounding, not the statistic: still a hit
    assert collect_second_moments(lm, [1], corpus, **dict(base, batch_tokens=64))[1].cached
    # another model (other fingerprint and weights)
    other = collect_second_moments(tiny_lm(seed=1), [1], corpus, **base)[1]
    assert not other.cached and not torch.equal(other.moment.mom, reference.mom)


def test_default_seq_len_is_capped_by_the_context(tmp_path):
    lm = tiny_lm()  # context length 64 < DEFAULT_SEQ_LEN
    result = collect_second_moments(lm, [0], make_corpus(), max_tokens=100, cache_dir=tmp_path)[0]
    assert json.loads(result.path.with_suffix(".json").read_text())["seq_len"] == 64


def test_edited_upstream_weights_recompute_but_own_down_projection_does_not(tmp_path):
    lm = tiny_lm()
    corpus = make_corpus()
    args = dict(max_tokens=100, seq_len=8, batch_tokens=32, cache_dir=tmp_path)
    original = second_moments(lm, [2], corpus, **args)[2]
    # Layer 2's own W never sees its keys change: still served from the cache.
    set_W(lm, 2, get_W(lm, 2) * 2.0)
    assert collect_second_moments(lm, [2], corpus, **args)[2].cached
    # Editing layer 0 changes layer 2's keys: the cache must not pose as the original.
    set_W(lm, 0, get_W(lm, 0) * 2.0)
    edited = collect_second_moments(lm, [2], corpus, **args)[2]
    assert not edited.cached and not torch.equal(edited.moment.mom, original.mom)


def test_partial_hit_computes_only_the_missing_layer(tmp_path):
    lm = tiny_lm()
    corpus = make_corpus()
    args = dict(max_tokens=100, seq_len=8, batch_tokens=32, cache_dir=tmp_path)
    second_moments(lm, [0, 1], corpus, **args)
    mixed = collect_second_moments(lm, [1, 2], corpus, **args)
    assert mixed[1].cached and not mixed[2].cached
    want = reference_moments(lm, [2], corpus, seq_len=8, max_tokens=100)[2]
    assert_close_moments(mixed[2].moment, want, rtol=1e-5)


@pytest.mark.parametrize("damage", ["garbage_tensor", "truncated_json", "wrong_count_in_json"])
def test_damaged_cache_entries_are_recomputed(tmp_path, damage, caplog):
    lm = tiny_lm()
    corpus = make_corpus()
    args = dict(max_tokens=100, seq_len=8, batch_tokens=32, cache_dir=tmp_path)
    first = collect_second_moments(lm, [1], corpus, **args)[1]
    tensor_path, meta_path = first.path, first.path.with_suffix(".json")
    if damage == "garbage_tensor":
        tensor_path.write_bytes(b"\x00" * 100)
    elif damage == "truncated_json":
        meta_path.write_text(meta_path.read_text()[:20])
    else:
        meta = json.loads(meta_path.read_text())
        meta["max_tokens"] = 5
        meta_path.write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="rlsedit.locate.stats"):
        again = collect_second_moments(lm, [1], corpus, **args)[1]
    assert not again.cached and "recomputing" in caplog.text
    assert_close_moments(again.moment, first.moment, rtol=1e-12)
    # repaired: the next request is a hit again
    assert collect_second_moments(lm, [1], corpus, **args)[1].cached


def test_a_second_process_waits_for_the_first_and_reads_its_entries(tmp_path, monkeypatch):
    # two processes that want the same missing statistics (benchmark methods started together):
    # the corpus pass runs once; the one that waited reads the entries the other wrote
    from rlsedit.locate import stats
    from two_processes import Gate, race

    real, gate = stats._accumulate, Gate()

    def gated_accumulate(*args, **kwargs):
        gate()
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "_accumulate", gated_accumulate)
    corpus, got = make_corpus(), {}

    def run(name):
        got[name] = collect_second_moments(tiny_lm(), [0, 2], corpus, max_tokens=100, seq_len=8,
                                           batch_tokens=32, cache_dir=tmp_path)

    race(run, gate)
    assert gate.entries == ["first"]
    for layer in (0, 2):
        assert not got["first"][layer].cached and got["second"][layer].cached
        assert torch.equal(got["first"][layer].moment.mom, got["second"][layer].moment.mom)
