"""General-capability checks: perplexity, recall of known facts, scored multiple choice.

Every function takes the data file's path and reports a ``chance`` figure beside its result.

* :func:`perplexity` — ``exp( Σ NLL / #predicted )`` over non-overlapping windows of a text
  file (WikiText-2); chance = the vocabulary size (a uniform model's perplexity).
* :func:`known_facts_recall` — ROME's ``known_1000.json``: the model knows a fact when
  greedy decoding after ``prompt`` yields the ``attribute`` (equivalently, every
  teacher-forced argmax is the attribute's token). Also the first-token recall (ROME
  selected these facts by GPT-2 XL's first predicted token).
* :func:`evaluate_choice_task` — zero-shot multiple choice without sampling: each choice's
  mean per-token log-likelihood after the prompt,
  ``s_c = (1/|c|) Σ_j log p(c_j | prompt, c_<j)``, and the prediction ``argmax_c s_c`` (the
  "highest probability answer" of AlphaEdit/RLSEdit's ``glue_eval``). The prompt templates
  follow ``glue_eval``'s zero-shot ones. Chance = ``1/#choices``; ``majority`` = share of
  the most frequent gold answer among the evaluated items.

Label conventions are GLUE's: SST-2 / sentiment 1 = positive, MRPC 1 = paraphrase, CoLA 1 =
acceptable, RTE **0 = entailment** (``glue_eval``'s ``rte_eval.py`` maps 1 to "True", which
inverts RTE's labels; we do not), NLI ``"entailment"`` / ``"not_entailment"``.

``n`` evaluates a seeded uniform sample of ``n`` items in file order (MMLU is sorted by
subject, so its first ``n`` would be a few subjects only).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from ..requests import target_text
from .datafiles import EvalDataError, check_count, field, read_json_list, read_jsonl, require_file, subsample
from .scoring import encode_continuation, eval_mode, next_token_logprobs, score_continuations

LETTERS = ("A", "B", "C", "D")


# --- perplexity ----------------------------------------------------------------------------

def perplexity(
    lm, path: str | Path, *, max_tokens: int = 20_000, window: int = 512, batch_size: int = 2
) -> dict[str, Any]:
    """Perplexity of the first ``max_tokens`` tokens of a text file.

    The token stream is cut into non-overlapping windows of ``window`` tokens; inside each
    window every token after the first is predicted from the ones before it (plus the
    tokenizer's BOS, where it adds one), so
    ``ppl = exp( Σ_w Σ_{t=2..|w|} −log p(w_t | w_<t) / Σ_w (|w| − 1) )``.
    """
    check_count(max_tokens, "max_tokens")
    check_count(window, "window")
    check_count(batch_size, "batch_size")
    if window < 2:
        raise EvalDataError(f"window must be at least 2 tokens, got {window}")
    path = require_file(path, "perplexity text")
    text = path.read_text(encoding="utf-8")
    tokenizer, model = lm.tokenizer, lm.model
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])  # BOS where the tokenizer adds one
    # tokenize a generous prefix of the text, not the whole file, for speed
    chars = min(len(text), max_tokens * 8)
    while True:
        ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if len(ids) > max_tokens or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise EvalDataError(f"perplexity text {str(path)!r} has fewer than 2 tokens")
    windows = [ids[s:s + window] for s in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    total_nll = 0.0
    predicted = 0
    with eval_mode(model):
        for start in range(0, len(windows), batch_size):
            group = windows[start:start + batch_size]
            # a short last window goes alone (no padding needed)
            for chunk in ([group] if len({len(w) for w in group}) == 1 else [[w] for w in group]):
                batch = torch.tensor([prefix + w for w in chunk], device=lm.device)
                logits = model(input_ids=batch).logits[:, len(prefix):, :]  # (B, W, V)
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                targets = batch[:, len(prefix) + 1:]  # (B, W-1): w_2..w_W
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1, :].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
                total_nll += float(nll)
                predicted += targets.numel()
    mean_nll = total_nll / predicted
    return {
        "ppl": math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else float("inf"),
        "nll": mean_nll,
        "tokens": len(ids),
        "predicted_tokens": predicted,
        "window": window,
        "chance": float(len(tokenizer)),
        "chance_note": "uniform next-token distribution: ppl = vocabulary size",
    }


# --- known facts ---------------------------------------------------------------------------

def known_facts_recall(
    lm, path: str | Path, *, n: int | None = None, seed: int = 0, batch_size: int = 16
) -> dict[str, Any]:
    """Share of ROME's known facts whose ``attribute`` greedy decoding reproduces after ``prompt``."""
    records = read_json_list(path, "known facts")
    keep = subsample(len(records), n, seed)
    prompts, answers = [], []
    for i in keep:
        where = f"known facts record {i}"
        prompts.append(field(records[i], "prompt", str, where))
        answers.append(field(records[i], "attribute", str, where).strip())
    scores = score_continuations(lm, prompts, [target_text(a) for a in answers], batch_size=batch_size)
    vocab = len(lm.tokenizer)
    items = [
        {"known_id": records[i].get("known_id", i), "recalled": s.all_correct, "first_token": s.argmax_ids[0] == s.token_ids[0]}
        for i, s in zip(keep, scores)
    ]
    return {
        "recall": statistics.fmean(float(x["recalled"]) for x in items),
        "first_token_recall": statistics.fmean(float(x["first_token"]) for x in items),
        "n": len(items),
        # guessing every token uniformly: mean over items of V^-|attribute tokens|
        "chance": statistics.fmean(vocab ** -len(s.token_ids) for s in scores),
        "first_token_chance": 1.0 / vocab,
        "items": items,
    }


# --- multiple choice -----------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceItem:
    """A prompt, its candidate continuations (scored as given) and the gold index."""

    prompt: str
    choices: tuple[str, ...]
    answer: int


def _binary(record: dict, key: str, where: str, positive: Any, negative: Any) -> int:
    value = record.get(key)
    if value == positive:
        return 1
    if value == negative:
        return 0
    raise EvalDataError(f"{where}: field {key!r} is {value!r}, expected {positive!r} or {negative!r}")


def _sst2(r: dict, where: str) -> ChoiceItem:
    prompt = f"Review :{field(r, 'sentence', str, where)}\nSentiment :"
    return ChoiceItem(prompt, (" negative", " positive"), _binary(r, "label", where, 1, 0))


def _sentiment(r: dict, where: str) -> ChoiceItem:
    prompt = ("For each snippet of text,label the sentiment of the text as positive or negative.The answer "
              f"should be exact 'positive' or 'negative'. text: {field(r, 'sentence', str, where)} answer:")
    return ChoiceItem(prompt, (" negative", " positive"), _binary(r, "label", where, "1", "0"))


def _mrpc(r: dict, where: str) -> ChoiceItem:
    prompt = (f"Are the sentences paraphrases of each other.\nSentence 1: {field(r, 'sentence1', str, where)}\n"
              f"Sentence 2: {field(r, 'sentence2', str, where)}\nAnswer:")
    return ChoiceItem(prompt, (" No", " Yes"), _binary(r, "label", where, 1, 0))


def _cola(r: dict, where: str) -> ChoiceItem:
    prompt = f"Is this sentence linguistically acceptable?\nSentence: {field(r, 'sentence', str, where)}\nAnswer:"
    return ChoiceItem(prompt, (" No", " Yes"), _binary(r, "label", where, 1, 0))


def _rte(r: dict, where: str) -> ChoiceItem:
    prompt = f"{field(r, 'sentence1', str, where)}\nquestion: {field(r, 'sentence2', str, where)} True or False?\nanswer:"
    # GLUE RTE: 0 = entailment ("True"), 1 = not_entailment ("False")
    return ChoiceItem(prompt, (" True", " False"), _binary(r, "label", where, 1, 0))


def _nli(r: dict, where: str) -> ChoiceItem:
    prompt = f"{field(r, 'sentence1', str, where)} entails the {field(r, 'sentence2', str, where)} True or False? Answer:"
    return ChoiceItem(prompt, (" False", " True"), _binary(r, "label", where, "entailment", "not_entailment"))


def _letter(value: Any, where: str, key: str) -> int:
    if value not in LETTERS:
        raise EvalDataError(f"{where}: field {key!r} is {value!r}, expected one of {list(LETTERS)}")
    return LETTERS.index(value)


def _four(r: dict, key: str, where: str) -> list[str]:
    options = field(r, key, list, where)
    if len(options) != 4 or not all(isinstance(o, str) for o in options):
        raise EvalDataError(f"{where}: field {key!r} must hold 4 strings, got {len(options)} items")
    return options


def _dialogue(r: dict, where: str) -> ChoiceItem:
    o = _four(r, "options", where)
    prompt = (f"Q: Given the following: {field(r, 'article', str, where)}\nWhich choice is correct?\n"
              f"(A){o[0]}\n(B){o[1]}\n(C){o[2]}\n(D){o[3]}\nAnswer:")
    return ChoiceItem(prompt, tuple(" " + x for x in LETTERS), _letter(r.get("answers"), where, "answers"))


def _glue_mmlu(r: dict, where: str) -> ChoiceItem:
    o = _four(r, "choices", where)
    prompt = (f"Question: {field(r, 'question', str, where)}\n"
              f"(A) {o[0]}\n(B) {o[1]}\n(C) {o[2]}\n(D) {o[3]}\nAnswer:")
    answer = field(r, "answer", int, where)
    if not 0 <= answer < 4:
        raise EvalDataError(f"{where}: field 'answer' is {answer}, expected 0..3")
    return ChoiceItem(prompt, tuple(" " + x for x in LETTERS), answer)


def _mmlu(r: dict, where: str) -> ChoiceItem:
    # the file's "input" is already the formatted question ending in "Answer:"
    return ChoiceItem(field(r, "input", str, where), tuple(" " + x for x in LETTERS),
                      _letter(r.get("output"), where, "output"))


CHOICE_TASKS: dict[str, Callable[[dict, str], ChoiceItem]] = {
    "sst2": _sst2,
    "sentiment_analysis": _sentiment,
    "mrpc": _mrpc,
    "cola": _cola,
    "rte": _rte,
    "nli": _nli,
    "dialogue": _dialogue,
    "glue_mmlu": _glue_mmlu,
    "mmlu": _mmlu,
}


def load_choice_items(task: str, path: str | Path) -> list[ChoiceItem]:
    """Parse every record of a task file into :class:`ChoiceItem` (errors name the line)."""
    if task not in CHOICE_TASKS:
        raise EvalDataError(f"unknown multiple-choice task {task!r}; choose from {sorted(CHOICE_TASKS)}")
    build = CHOICE_TASKS[task]
    return [build(r, f"{task} record {i}") for i, r in enumerate(read_jsonl(path, task))]


def score_choices(lm, items: Sequence[ChoiceItem], *, batch_size: int = 16) -> list[list[float]]:
    """``s_c = (1/|c|) Σ_j log p(c_j | prompt, c_<j)`` for every choice of every item.

    Items whose choices are all single tokens are scored with one forward pass per prompt
    (:func:`~rlsedit.eval.scoring.next_token_logprobs`); the rest choice by choice.
    """
    tokenizer = lm.tokenizer
    single: list[int] = []
    multi: list[int] = []
    choice_ids: list[list[list[int]]] = []
    for index, item in enumerate(items):
        ids = [encode_continuation(tokenizer, c) for c in item.choices]
        choice_ids.append(ids)
        (single if all(len(x) == 1 for x in ids) else multi).append(index)
    out: list[list[float] | None] = [None] * len(items)
    if single:
        table = next_token_logprobs(lm, [items[i].prompt for i in single],
                                    [[x[0] for x in choice_ids[i]] for i in single], batch_size=batch_size)
        for i, logps in zip(single, table):
            out[i] = [float(v) for v in logps]
    if multi:
        flat = [(i, choice) for i in multi for choice in items[i].choices]
        scores = score_continuations(lm, [items[i].prompt for i, _ in flat], [c for _, c in flat],
                                     batch_size=batch_size)
        pos = 0
        for i in multi:
            k = len(items[i].choices)
            out[i] = [float(scores[pos + j].logprobs.mean()) for j in range(k)]
            pos += k
    return out  # type: ignore[return-value]


def evaluate_choice_task(
    lm, task: str, path: str | Path, *, n: int | None = None, seed: int = 0, batch_size: int = 16
) -> dict[str, Any]:
    """Accuracy (and, for two-way tasks, weighted F1 and MCC) of log-likelihood choice."""
    items = load_choice_items(task, path)
    keep = subsample(len(items), n, seed)
    chosen = [items[i] for i in keep]
    if not chosen:
        raise EvalDataError(f"{task}: the file {str(path)!r} has no records")
    scores = score_choices(lm, chosen, batch_size=batch_size)
    preds = [max(range(len(s)), key=lambda k: s[k]) for s in scores]  # first index wins a tie
    gold = [item.answer for item in chosen]
    k = len(chosen[0].choices)
    result: dict[str, Any] = {
        "acc": statistics.fmean(float(p == g) for p, g in zip(preds, gold)),
        "n": len(chosen),
        "chance": 1.0 / k,
        "majority": Counter(gold).most_common(1)[0][1] / len(gold),
        "predicted_distribution": {chosen[0].choices[c].strip(): preds.count(c) / len(preds) for c in range(k)},
    }
    if k == 2:
        result["f1_weighted"] = float(f1_score(gold, preds, average="weighted", labels=[0, 1], zero_division=0))
        result["mcc"] = float(matthews_corrcoef(gold, preds)) if len(set(gold)) > 1 or len(set(preds)) > 1 else 0.0
    return result
