"""Subject-token location and keys (down-projection inputs at the subject's last token)."""

from __future__ import annotations

import copy

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import FAMILIES, make_lm, requests
from rlsedit.errors import InvalidRequestError
from rlsedit.locate.keys import compute_keys
from rlsedit.locate.tokens import encode_at_subject, prompt_texts, request_template
from rlsedit.model.hooks import capture
from rlsedit.model.weights import block, down_proj
from rlsedit.requests import EditRequest

PREFIXES = ["{}", "The city is far away. {}", "Because I said so. {}"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return make_lm(request.param)


def _last_subject_token(lm, text: str, end: int) -> int:
    # Independent of offsets (MEMIT's way): the tokens of text[:end] are a prefix of the
    # tokens of text when the subject is followed by a space, a comma or the end.
    return len(lm.tokenizer(text[:end], add_special_tokens=True)["input_ids"]) - 1


def test_subject_position_matches_prefix_tokenization(lm):
    items = prompt_texts(requests(), PREFIXES)
    _, positions = encode_at_subject(lm, items)
    for item, pos in zip(items, positions):
        assert item.text[item.start:item.end] in {r.subject for r in requests()}
        assert pos == _last_subject_token(lm, item.text, item.end), item.text


def test_prompt_without_slot_uses_the_verbatim_subject():
    slotted = EditRequest(id="s", prompt="{} is located in", subject="Rome", target_new="Paris")
    verbatim = EditRequest(id="v", prompt="Rome is located in", subject="Rome", target_new="Paris")
    assert request_template(verbatim) == slotted.prompt


def _keys_by_hand(lm, layer, reqs, prefixes):
    """Full forward per text, down-projection input captured; MEMIT's mean of the per-type means:
    the bare prompt (first) weighs 1/2, the generated prefixes share the other 1/2."""
    cols = []
    for r in reqs:
        rows = []
        for prefix in prefixes:
            text = prefix.replace("{}", r.text)
            start = prefix.index("{}") + r.prompt.index("{}")
            pos = _last_subject_token(lm, text, start + len(r.subject))
            ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.no_grad(), capture(down_proj(lm, layer)) as seen:
                lm.model(input_ids=ids)
            rows.append(seen[0][0, pos])
        cols.append(0.5 * rows[0] + 0.5 * torch.stack(rows[1:]).mean(0))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("layer", [0, 2])
def test_keys_equal_unbatched_full_forward(lm, layer):
    K = compute_keys(lm, layer, requests(), PREFIXES)
    assert K.shape == (lm.d_k, 3) and K.dtype == torch.float32
    assert torch.isfinite(K).all()
    torch.testing.assert_close(K, _keys_by_hand(lm, layer, requests(), PREFIXES), rtol=1e-5, atol=1e-6)


def test_the_bare_prompt_weighs_half_and_uniform_stays_an_option(lm):
    from rlsedit.locate.keys import prefix_weights

    w = prefix_weights(["{}"] + [f"Prefix {i}. {{}}" for i in range(5)])
    assert w.tolist() == pytest.approx([0.5] + [0.1] * 5)
    assert prefix_weights(["{}"]).tolist() == [1.0]
    assert prefix_weights(["A. {}", "B. {}"]).tolist() == pytest.approx([0.5, 0.5])  # one type only
    assert prefix_weights(PREFIXES, "uniform").tolist() == pytest.approx([1 / 3] * 3)
    per = [compute_keys(lm, 1, requests(), [p]) for p in PREFIXES]  # one key per prefix
    torch.testing.assert_close(compute_keys(lm, 1, requests(), PREFIXES),
                               0.5 * per[0] + 0.25 * per[1] + 0.25 * per[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compute_keys(lm, 1, requests(), PREFIXES, average="uniform"),
                               (per[0] + per[1] + per[2]) / 3, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="average"):
        compute_keys(lm, 1, requests(), PREFIXES, average="mean")


def test_batch_size_does_not_change_keys(lm):
    a = compute_keys(lm, 1, requests(), PREFIXES, batch_size=64)
    b = compute_keys(lm, 1, requests(), PREFIXES, batch_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_float32_keys_within_bound_of_float64(lm):
    # float64 checks the math, float32 runs it: they agree to float32 precision
    lm64 = copy.copy(lm)
    lm64.model = copy.deepcopy(lm.model).double()
    K32 = compute_keys(lm, 2, requests(), PREFIXES)
    K64 = compute_keys(lm64, 2, requests(), PREFIXES)
    assert ((K32.double() - K64.double()).norm() / K64.double().norm()).item() < 1e-5


def test_forward_stops_at_the_down_projection(lm):
    calls = []
    handles = [block(lm, j).register_forward_hook(lambda *_a, j=j: calls.append(j)) for j in range(lm.n_layers)]
    try:
        compute_keys(lm, 1, requests(), PREFIXES)
    finally:
        for h in handles:
            h.remove()
    assert set(calls) == {0}  # block 1 never finished; nothing above it ran


def test_empty_batch(lm):
    assert compute_keys(lm, 0, [], PREFIXES).shape == (lm.d_k, 0)


def test_subject_missing_names_the_request(lm):
    bad = EditRequest(id="nowhere", prompt="Paris is the capital of", subject="Rome", target_new="Italy")
    with pytest.raises(InvalidRequestError, match="nowhere"):
        compute_keys(lm, 0, requests() + [bad], PREFIXES)


def test_prompt_longer_than_context_is_refused():
    lm = make_lm("llama", max_positions=16)
    long = EditRequest(id="long", prompt="{} " + "is located in Paris " * 10, subject="Rome", target_new="x")
    with pytest.raises(InvalidRequestError, match="long.*context"):
        compute_keys(lm, 0, [long], ["{}"])


@pytest.mark.parametrize("prefixes", [[], ["no slot"], ["{} and {}"], "{}"])
def test_bad_prefixes(lm, prefixes):
    with pytest.raises(InvalidRequestError):
        compute_keys(lm, 0, requests(), prefixes)


@pytest.mark.parametrize("layer", [-1, 4, 1.0, True])
def test_bad_layer(lm, layer):
    with pytest.raises(InvalidRequestError, match="layer"):
        compute_keys(lm, layer, requests(), PREFIXES)
