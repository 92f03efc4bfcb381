"""Editing through the chat template (``chat_prefix``): one more context prefix, the prompt as the
user turn of the tokenizer's chat template, with the target after the assistant's header."""

from __future__ import annotations

import pytest
import torch

from locate_tiny import one_thread  # noqa: F401  (autouse fixture)
from locate_tiny import make_lm
from rlsedit.editors import ROME, RLSEdit
from rlsedit.editors.config import EditConfig, FTConfig, RLSEditConfig, ROMEConfig
from rlsedit.errors import InvalidRequestError
from rlsedit.eval.generation import chat_prompt
from rlsedit.locate.keys import prefix_weights
from rlsedit.locate.prefixes import chat_context_prefix
from rlsedit.locate.target_config import TargetConfig
from rlsedit.locate.targets import _build_problem
from rlsedit.locate.tokens import prompt_texts
from rlsedit.model.weights import get_W
from rlsedit.requests import EditRequest, target_text

# a small template in the usual shape: BOS text, a system turn, the user turn, the assistant header
TEMPLATE = ("{{ bos_token }}<|system|> Be brief.<|end|>\n{% for m in messages %}<|{{ m['role'] }}|> "
            "{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT_BODY = "<|system|> Be brief.<|end|>\n<|user|> {}<|end|>\n<|assistant|>"
REQUESTS = [EditRequest(id="a", prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(id="b", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="Swedish")]
LAYERS = (1, 2)


def _chat_lm(family: str = "llama", template: str | None = TEMPLATE):
    lm = make_lm(family)
    lm.tokenizer.chat_template = template
    return lm


def _moments(lm, n=400):
    X = torch.randn(lm.d_k, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {l: X @ X.T / n for l in range(lm.n_layers)}


def test_the_prefix_holds_one_slot_and_no_second_bos():
    # the tokenizer adds no BOS itself: the template's BOS text stays, so the text starts with one BOS
    plain = _chat_lm("llama")
    assert chat_context_prefix(plain.tokenizer) == "<bos>" + CHAT_BODY
    # this one adds <bos> itself: the template's is dropped, so the encoding holds exactly one
    gemma = _chat_lm("gemma3_text")
    prefix = chat_context_prefix(gemma.tokenizer)
    assert prefix == CHAT_BODY and prefix.count("{}") == 1
    for lm, text in ((plain, "<bos>" + CHAT_BODY), (gemma, prefix)):
        ids = lm.tokenizer(text.replace("{}", "Paris"), add_special_tokens=True)["input_ids"]
        assert ids[0] == lm.tokenizer.bos_token_id and ids.count(lm.tokenizer.bos_token_id) == 1


def test_a_template_without_exactly_one_slot_is_refused():
    writes_braces = "{% for m in messages %}{{ m['content'] }} {{ '{}' }}{% endfor %}"
    with pytest.raises(InvalidRequestError, match="makes 2 '{}'"):
        chat_context_prefix(_chat_lm(template=writes_braces).tokenizer)
    drops_content = "{% for m in messages %}<|user|> hello{% endfor %}<|assistant|>"
    with pytest.raises(InvalidRequestError, match="makes 0 '{}'"):
        chat_context_prefix(_chat_lm(template=drops_content).tokenizer)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        chat_context_prefix(_chat_lm(template=None).tokenizer)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_chat_row_is_the_chat_formatted_prompt_followed_by_the_target(family):
    lm = _chat_lm(family)
    editor = RLSEdit(lm, RLSEditConfig(layers=LAYERS, context_count=1, chat_prefix=True), moments=_moments(lm))
    prefixes = editor.prefixes_
    assert len(prefixes) == 3 and prefixes[-1] == chat_context_prefix(lm.tokenizer)
    rows = prompt_texts(REQUESTS, prefixes)
    for i, request in enumerate(REQUESTS):
        chat_row = rows[i * len(prefixes) + 2]
        # the same text the chat evaluation asks (eval.generation.chat_prompt)
        assert chat_row.text == chat_prompt(lm.tokenizer, request.text)
        assert chat_row.text[chat_row.start:chat_row.end] == request.subject
    # the value targets' problem: the chat row is the chat prompt's tokens, then the target (teacher forcing)
    problem = _build_problem(lm, REQUESTS, prefixes, TargetConfig())
    assert problem.n_prefixes == 3
    for i, request in enumerate(REQUESTS):
        target = lm.tokenizer(target_text(request.target_new), add_special_tokens=False)["input_ids"]
        chat_ids = lm.tokenizer(chat_prompt(lm.tokenizer, request.text), add_special_tokens=True)["input_ids"]
        assert problem.ids[i * 3 + 2] == chat_ids + target[:-1]
        assert chat_ids.count(lm.tokenizer.bos_token_id) <= 1
    # in the per-type key average the chat prefix joins the generated ones; the bare prompt keeps 1/2
    assert prefix_weights(prefixes).tolist() == [0.5, 0.25, 0.25]


def test_without_the_option_nothing_changes():
    lm = _chat_lm()
    editor = RLSEdit(lm, RLSEditConfig(layers=LAYERS, context_count=1), moments=_moments(lm))
    assert len(editor.prefixes_) == 2 and not any("<|user|>" in p for p in editor.prefixes_)


def test_a_missing_template_is_an_error_before_anything_is_applied():
    lm = _chat_lm(template=None)
    W0 = {l: get_W(lm, l) for l in LAYERS}
    editor = RLSEdit(lm, RLSEditConfig(layers=LAYERS, context_count=1, chat_prefix=True), moments=_moments(lm))
    with pytest.raises(InvalidRequestError, match="no chat template") as err:
        editor.partial_fit(REQUESTS)
    assert err.value.exit_code == 3
    for l in LAYERS:
        assert torch.equal(get_W(lm, l), W0[l])


def test_the_edit_runs_and_a_resumed_editor_keeps_its_prefixes():
    lm = _chat_lm()
    config = RLSEditConfig(layers=LAYERS, context_count=1, chat_prefix=True, v_num_grad_steps=4)
    editor = RLSEdit(lm, config, moments=_moments(lm))
    W0 = get_W(lm, LAYERS[-1])
    record = editor.propose(REQUESTS).commit()
    assert not torch.equal(get_W(lm, LAYERS[-1]), W0)
    # the keys average over the chat context too: they differ from the same edit without it
    plain = _chat_lm()
    plain_record = RLSEdit(plain, config.replace(chat_prefix=False), moments=_moments(plain)).propose(REQUESTS).commit()
    assert not torch.allclose(record.tensors["layers.1.K"], plain_record.tensors["layers.1.K"])
    # a resumed editor is given the stored prefixes (chat prefix included): no second one is added
    resumed = RLSEdit(_chat_lm(), config, moments=_moments(lm), prefixes=editor.prefixes_)
    assert resumed.prefixes_ == editor.prefixes_


def test_rome_takes_the_option_and_the_config_checks_it():
    lm = _chat_lm()
    rome = ROME(lm, ROMEConfig(layers=(2,), context_template_length_params=((2, 1),), chat_prefix=True),
                moments=_moments(lm))
    assert rome.prefixes_[-1] == chat_context_prefix(lm.tokenizer) and len(rome.prefixes_) == 3
    with pytest.raises(InvalidRequestError, match="chat_prefix must be true or false"):
        EditConfig(chat_prefix="yes")
    with pytest.raises(InvalidRequestError, match="FT fine-tunes on the bare prompts"):
        FTConfig(chat_prefix=True)
    # saved only when set: a state saved before the option compares equal to a default config
    assert "chat_prefix" not in RLSEditConfig().to_dict()
    on = RLSEditConfig(chat_prefix=True)
    assert on.to_dict()["chat_prefix"] is True and RLSEditConfig.from_dict(on.to_dict()) == on
