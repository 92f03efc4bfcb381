"""Generation-based edit metrics: does the model *say* the new fact when it has to generate it?

The teacher-forced metrics (:mod:`rlsedit.eval.counterfact`, :mod:`rlsedit.eval.zsre`) feed
the answer in and compare probabilities; these let the model decode and read what it wrote
(the WILD protocol of "The Mirage of Model Editing", ACL 2025). They are reported beside the
teacher-forced ones, never instead of them.

For each edit (a seeded sample of ``n`` when asked):

* **edit prompt** — greedy continuation of ``request.text`` (stop at ``"."``, a newline or
  EOS; at most ``max_new_tokens`` tokens). *Begins with*: the SQuAD-normalised continuation
  starts with the normalised target, word for word; *mentions*: the normalised target occurs
  as consecutive words anywhere in it. Both for the new target and for the old one (``old_*``:
  how often the model still says the old fact).
* **paraphrases** — the same, labelled by ``paraphrase_kind``: ``"paraphrase"`` for prompts
  that restate the edit prompt so the object is the natural next words (ROME-layout
  ``paraphrase_prompts``, zsRE ``rephrase``); ``"open"`` for the MEND CounterFact layout's
  ``rephrase_prompt``, which mixes ROME paraphrases with open generation prompts ("X is known
  for") whose next words need not be the object — for those only *mentions* is meaningful.
  The kind is read from the data file's layout (:func:`paraphrase_kind_of_file`): one record
  cannot be told apart reliably, a file can.
* **where the unedited model answered** — a prompt need not make the object the next words even
  when it asks for it ("X passed away in" → "1947"); with ``pre_edit`` also holding the edit
  and paraphrase prompts' unedited continuations, ``edit_begins_where_answered`` and
  ``paraphrase_begins_where_answered`` score only the prompts whose unedited continuation
  began with the *old* object, so the two are compared on prompts that elicit the fact at all
  (``*_answered_pre_edit``: how many did).
* **neighbourhood** — *unchanged*: the greedy continuation is identical to the unedited
  model's (``pre_edit``, from :func:`pre_edit_generations` on the unedited model); *first word
  unchanged*: only its first normalised word is; *new mentions*: it mentions the edit's new
  object (bleed into other subjects, beside the unedited continuations' rate); *true
  begins / mentions*: it still says the neighbour's answer. Twelve identical greedy tokens is
  a strict bar: a random weight change of one edit's norm alters about as many neighbour
  continuations as the edit does (benchmarks/quality/README.md), mostly after the first word,
  so the first word and the bleed tell locality apart from drift.
* **portability** — the record's ``generation_prompts`` (ROME-layout CounterFact: open text
  that needs the edited fact, "Danielle Darrieux's mother tongue is", "People in Wellington's
  twin city speak the language of"): *mentions* the new target, and *still mentions* the old
  one, within the token cap. Their next words need not be the object, so begins-with is not
  reported. A record without generation prompts contributes nothing (its edit prompt is not
  asked again). Off with ``portability=False``.
* **chat** — ``request.text`` asked as the user turn through the tokenizer's chat template
  (:func:`chat_prompt`), the assistant's answer scored the same way. Chat answers restate the
  question before answering, so *mentions* is the chat figure that counts.

Every result carries ``samples``: up to 30 ``(prompt, generation, verdict)`` rows drawn from
every kind, so a reader can check the scorer by eye.
"""

from __future__ import annotations

import random
import re
import statistics
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..locate.prefixes import chat_text, has_chat_template
from ..requests import EditRequest, iter_records
from .datafiles import EvalDataError
from .decoding import greedy_generate

STOP_STRINGS: tuple[str, ...] = (".", "\n")  # EOS ends decoding inside greedy_generate
PARAPHRASE = "paraphrase"
OPEN = "open"
PARAPHRASE_KINDS = (PARAPHRASE, OPEN)
PORTABILITY = "portability"
SAMPLE_KINDS = ("edit", PARAPHRASE, OPEN, "neighbour", PORTABILITY, "chat")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


class ChatTemplateError(EvalDataError):
    """The tokenizer has no chat template, so a question cannot be asked in chat form."""


@dataclass(frozen=True)
class GenerationConfig:
    """How the generation metrics run. Every field has a default and help."""

    max_new_tokens: int = field(default=12, metadata={"help": "token cap of each raw-prompt continuation"})
    chat_max_new_tokens: int = field(default=24, metadata={
        "help": "token cap of each chat answer (chat answers restate the question before the object)"})
    n: int | None = field(default=None, metadata={"help": "evaluate a seeded sample of n edits (None: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the edit sample and of the printed sample rows"})
    paraphrase_kind: str = field(default=PARAPHRASE, metadata={
        "help": "'paraphrase' (object is the natural next words: score begins-with) or 'open' (mentions only)"})
    chat: bool | None = field(default=None, metadata={
        "help": "ask through the chat template: True (error without one), False, None (when the tokenizer has one)"})
    portability: bool = field(default=True, metadata={
        "help": "also score the records' generation_prompts (ROME layout): mentions of the new and the old target"})
    samples: int = field(default=30, metadata={"help": "(prompt, generation, verdict) rows kept in the result"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generation batch"})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "chat_max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EvalDataError(f"{name} must be a positive integer, got {value!r}")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n <= 0):
            raise EvalDataError(f"n must be a positive integer or None, got {self.n!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise EvalDataError(f"samples must be a non-negative integer, got {self.samples!r}")
        if self.paraphrase_kind not in PARAPHRASE_KINDS:
            raise EvalDataError(f"paraphrase_kind must be one of {PARAPHRASE_KINDS}, got {self.paraphrase_kind!r}")


# ---- scoring text ------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's normaliser: lowercase, drop punctuation, drop the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def begins_with(generation: str, target: str) -> bool:
    """The normalised generation's first words are the normalised target's words."""
    want = normalize_answer(target).split()
    return bool(want) and normalize_answer(generation).split()[:len(want)] == want


def mentions(generation: str, target: str) -> bool:
    """The normalised target occurs as consecutive whole words in the normalised generation."""
    want = normalize_answer(target).split()
    words = normalize_answer(generation).split()
    return bool(want) and any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))


def first_word(generation: str) -> str:
    """The normalised generation's first word (``""`` when it has none)."""
    words = normalize_answer(generation).split()
    return words[0] if words else ""


def verdict(generation: str, target: str) -> str:
    """``"begins"``, ``"mentions"`` or ``"misses"``: how the generation relates to the target."""
    return "begins" if begins_with(generation, target) else "mentions" if mentions(generation, target) else "misses"


# ---- prompts -----------------------------------------------------------------------------------

def chat_prompt(tokenizer, question: str) -> str:
    """``question`` as the user turn of the tokenizer's chat template, ready for the assistant.

    The returned text is what :func:`~rlsedit.eval.decoding.greedy_generate` encodes (with the
    tokenizer's special tokens; :func:`~rlsedit.locate.prefixes.chat_text` drops a template's BOS
    when the tokenizer adds one). A tokenizer without a template raises
    :class:`ChatTemplateError` (a raw prompt would measure something else).
    """
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"the tokenizer {name!r} has no chat template, so the question cannot be asked in chat form; "
            "use an instruct model with a template (SmolLM2-Instruct has one) or turn chat evaluation off")
    return chat_text(tokenizer, question)


def paraphrase_kind_of_file(path: str | Path) -> str:
    """``"open"`` for the MEND/EasyEdit CounterFact layout (``rephrase_prompt`` mixes paraphrases
    with open generation prompts), ``"paraphrase"`` for every other layout (ROME
    ``paraphrase_prompts``, zsRE ``rephrase``, ours ``paraphrases``); read from the first record."""
    for _, record in iter_records(path):
        if isinstance(record, dict) and "rephrase_prompt" in record and "requested_rewrite" not in record:
            return OPEN
        return PARAPHRASE
    return PARAPHRASE


def sample_positions(total: int, n: int | None, seed: int) -> list[int]:
    """A seeded sample of ``min(n, total)`` positions out of ``range(total)``, in ascending order."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def chat_enabled(lm, config: GenerationConfig) -> bool:
    """Whether ``config`` asks through the chat template on ``lm`` (``chat=True`` without one raises)."""
    if config.chat is None:
        return has_chat_template(lm.tokenizer)
    if config.chat:
        chat_prompt(lm.tokenizer, "check")  # raises ChatTemplateError before any generation
    return config.chat


# ---- evaluation --------------------------------------------------------------------------------

def pre_edit_prompts(request: EditRequest, config: GenerationConfig = GenerationConfig()) -> tuple[str, ...]:
    """The prompts of ``request`` whose unedited continuation :func:`evaluate_generation` reads."""
    scored = config.paraphrase_kind == PARAPHRASE
    return (request.text, *(request.paraphrases if scored else ()), *request.neighborhood)


def pre_edit_generations(lm, requests: Sequence[EditRequest], config: GenerationConfig = GenerationConfig()
                         ) -> dict[str, str]:
    """Greedy continuations of the sampled edits' edit, paraphrase and neighbourhood prompts
    (prompt → text): run it on the unedited model and pass the result as ``pre_edit`` to
    :func:`evaluate_generation`. Open rephrase prompts are left out: only mentions is scored
    there, so their unedited text is never read."""
    chosen = [requests[i] for i in sample_positions(len(requests), config.n, config.seed)]
    prompts = list(dict.fromkeys(p for r in chosen for p in pre_edit_prompts(r, config)))
    if not prompts:
        return {}
    texts = greedy_generate(lm, prompts, config.max_new_tokens, stop=STOP_STRINGS, batch_size=config.batch_size)
    return dict(zip(prompts, texts))


def _mean(values: Sequence[bool | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def evaluate_generation(
    lm,
    requests: Sequence[EditRequest],
    config: GenerationConfig = GenerationConfig(),
    *,
    pre_edit: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Generation metrics of ``requests`` on ``lm`` as it is now (see the module docstring).

    ``pre_edit`` maps prompts to the unedited model's continuations; without it (or for a prompt
    it lacks) *unchanged* and the *where answered* figures are ``None``. Returns ``{"summary", "counts",
    "records", "samples", "settings", "notes"}``; ``summary`` holds fractions in ``[0, 1]``
    (``None`` where nothing was scored), each a mean over prompts of its kind. ``records`` keep
    each edit's ``position`` in ``requests``.
    """
    if not requests:
        raise EvalDataError("evaluate_generation needs at least one edit request")
    positions = sample_positions(len(requests), config.n, config.seed)
    chat = chat_enabled(lm, config)
    kind = config.paraphrase_kind

    # one greedy_generate call for every raw prompt, one for every chat prompt (batched inside)
    portable = {i: _portability_prompts(requests[i]) if config.portability else () for i in positions}
    raw: list[str] = []
    for i in positions:
        r = requests[i]
        raw += [r.text, *r.paraphrases, *r.neighborhood, *portable[i]]
    raw = list(dict.fromkeys(raw))
    raw_text = dict(zip(raw, greedy_generate(lm, raw, config.max_new_tokens, stop=STOP_STRINGS,
                                             batch_size=config.batch_size)))
    chat_text: dict[str, str] = {}
    if chat:
        questions = list(dict.fromkeys(requests[i].text for i in positions))
        answers = greedy_generate(lm, [chat_prompt(lm.tokenizer, q) for q in questions], config.chat_max_new_tokens,
                                  stop=STOP_STRINGS, batch_size=config.batch_size)
        chat_text = dict(zip(questions, answers))

    def answered_before(prompt: str, old: str | None) -> bool | None:
        """Whether the unedited model's continuation of ``prompt`` began with the old object."""
        before = None if pre_edit is None else pre_edit.get(prompt)
        return None if before is None or old is None else begins_with(before, old)

    records = []
    for i in positions:
        r = requests[i]
        gen = raw_text[r.text]
        old = r.target_true
        rec: dict[str, Any] = {
            "position": i, "id": r.id, "target_new": r.target_new, "target_true": old,
            "edit": {"prompt": r.text, "generation": gen, "new_begins": begins_with(gen, r.target_new),
                     "new_mentions": mentions(gen, r.target_new),
                     "old_begins": None if old is None else begins_with(gen, old),
                     "old_mentions": None if old is None else mentions(gen, old),
                     "old_begins_pre_edit": answered_before(r.text, old)},
            "paraphrases": [{"prompt": p, "generation": raw_text[p], "kind": kind,
                             "new_begins": begins_with(raw_text[p], r.target_new),
                             "new_mentions": mentions(raw_text[p], r.target_new),
                             "old_begins_pre_edit": answered_before(p, old)} for p in r.paraphrases],
            "neighbours": [],
            "portability": [{"prompt": p, "generation": raw_text[p],
                             "new_mentions": mentions(raw_text[p], r.target_new),
                             "old_mentions": None if old is None else mentions(raw_text[p], old)}
                            for p in portable[i]],
        }
        for j, p in enumerate(r.neighborhood):
            answer = r.neighborhood_answers[j] if j < len(r.neighborhood_answers) else None
            before = None if pre_edit is None else pre_edit.get(p)
            rec["neighbours"].append({
                "prompt": p, "generation": raw_text[p], "pre_edit": before, "answer": answer,
                "unchanged": None if before is None else raw_text[p] == before,
                "first_word_unchanged": None if before is None else first_word(raw_text[p]) == first_word(before),
                "new_mentions": mentions(raw_text[p], r.target_new),
                "pre_edit_new_mentions": None if before is None else mentions(before, r.target_new),
                "true_begins": None if answer is None else begins_with(raw_text[p], answer),
                "true_mentions": None if answer is None else mentions(raw_text[p], answer)})
        if chat:
            answer = chat_text[r.text]
            rec["chat"] = {"question": r.text, "generation": answer, "new_begins": begins_with(answer, r.target_new),
                           "new_mentions": mentions(answer, r.target_new),
                           "old_mentions": None if old is None else mentions(answer, old)}
        records.append(rec)

    para = [p for rec in records for p in rec["paraphrases"]]
    neigh = [n for rec in records for n in rec["neighbours"]]
    chats = [rec["chat"] for rec in records if "chat" in rec]
    port = [p for rec in records for p in rec["portability"]]
    edits_answered = [rec["edit"] for rec in records if rec["edit"]["old_begins_pre_edit"]]
    para_answered = [p for p in para if p["old_begins_pre_edit"]] if kind == PARAPHRASE else []
    summary = {
        "edit_begins": _mean([rec["edit"]["new_begins"] for rec in records]),
        "edit_mentions": _mean([rec["edit"]["new_mentions"] for rec in records]),
        "old_begins": _mean([rec["edit"]["old_begins"] for rec in records]),
        "old_mentions": _mean([rec["edit"]["old_mentions"] for rec in records]),
        "paraphrase_begins": _mean([p["new_begins"] for p in para]) if kind == PARAPHRASE else None,
        "paraphrase_mentions": _mean([p["new_mentions"] for p in para]) if kind == PARAPHRASE else None,
        "open_mentions": _mean([p["new_mentions"] for p in para]) if kind == OPEN else None,
        "edit_answered_pre_edit": _mean([rec["edit"]["old_begins_pre_edit"] for rec in records]),
        "edit_begins_where_answered": _mean([e["new_begins"] for e in edits_answered]),
        "paraphrase_answered_pre_edit": (_mean([p["old_begins_pre_edit"] for p in para])
                                         if kind == PARAPHRASE else None),
        "paraphrase_begins_where_answered": _mean([p["new_begins"] for p in para_answered]),
        "neighbour_unchanged": _mean([n["unchanged"] for n in neigh]),
        "neighbour_first_word_unchanged": _mean([n["first_word_unchanged"] for n in neigh]),
        "neighbour_new_mentions": _mean([n["new_mentions"] for n in neigh]),
        "neighbour_new_mentions_pre_edit": _mean([n["pre_edit_new_mentions"] for n in neigh]),
        "neighbour_true_begins": _mean([n["true_begins"] for n in neigh]),
        "neighbour_true_mentions": _mean([n["true_mentions"] for n in neigh]),
        "portability_mentions": _mean([p["new_mentions"] for p in port]),
        "portability_old_mentions": _mean([p["old_mentions"] for p in port]),
        "chat_mentions": _mean([c["new_mentions"] for c in chats]) if chat else None,
        "chat_begins": _mean([c["new_begins"] for c in chats]) if chat else None,
        "chat_old_mentions": _mean([c["old_mentions"] for c in chats]) if chat else None,
    }
    notes = [
        f"greedy decoding, stop at {STOP_STRINGS!r} or EOS, at most {config.max_new_tokens} tokens "
        f"({config.chat_max_new_tokens} for chat answers); texts SQuAD-normalised; begins = the continuation "
        "starts with the target's words, mentions = the target's words occur in it",
        f"paraphrase prompts are scored as {kind!r}: "
        + ("begins-with is meaningful (the object is the natural next words)" if kind == PARAPHRASE else
           "open generation prompts (MEND rephrase_prompt), so only mentions is reported")
        + "; where answered: only the prompts whose unedited continuation began with the old object",
        "neighbour unchanged: the greedy continuation is identical to the unedited model's; first word "
        "unchanged: its first normalised word is; new mentions: it mentions the edit's new object (bleed), "
        "beside the unedited continuation's rate"
        + ("" if pre_edit is not None else " (no pre-edit generations were given: not computed)"),
        ("portability: the records' generation prompts (open text needing the edited fact); only mentions is "
         "meaningful there (the object need not be the next words)" if port else
         "portability: not measured (" + ("turned off" if not config.portability else
                                          "no record has generation prompts") + ")"),
        "chat: the edit prompt as the user turn of the tokenizer's chat template" if chat else
        "chat: not measured (" + ("turned off" if config.chat is False else "the tokenizer has no chat template") + ")",
    ]
    cut = sorted({t for rec in records for t in (rec["target_new"], rec["target_true"])
                  if t is not None and any(stop in t for stop in STOP_STRINGS)})
    if cut:  # decoding stops inside such a target, so its begins-with can never hold
        notes.append(f"targets containing a stop string cannot be said in full: {cut[:5]}")
    return {
        "summary": summary,
        "counts": {"edits": len(records), "edits_total": len(requests), "paraphrases": len(para),
                   "neighbours": len(neigh), "portability": len(port), "chat": len(chats),
                   "edits_answered_pre_edit": len(edits_answered), "paraphrases_answered_pre_edit": len(para_answered)},
        "records": records,
        "samples": sample_rows(records, config.samples, seed=config.seed),
        "settings": {"max_new_tokens": config.max_new_tokens, "chat_max_new_tokens": config.chat_max_new_tokens,
                     "n": config.n, "seed": config.seed, "paraphrase_kind": kind, "chat": chat,
                     "portability": config.portability, "stop": list(STOP_STRINGS)},
        "notes": notes,
    }


def _portability_prompts(request: EditRequest) -> tuple[str, ...]:
    """The request's generation prompts, each once (ROME's lists repeat prompts)."""
    return tuple(dict.fromkeys(request.generation_prompts))


def sample_rows(records: Sequence[Mapping[str, Any]], count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``count`` ``{"kind", "id", "prompt", "generation", "target", "verdict"}`` rows, taken
    in turn from each kind (edit, paraphrase/open, neighbour, portability, chat) of a seeded shuffle."""
    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in SAMPLE_KINDS}
    for rec in records:
        edit = rec["edit"]
        old = f" (old: {verdict(edit['generation'], rec['target_true'])})" if rec.get("target_true") else ""
        by_kind["edit"].append({"kind": "edit", "id": rec["id"], "prompt": edit["prompt"],
                                "generation": edit["generation"], "target": rec["target_new"],
                                "verdict": verdict(edit["generation"], rec["target_new"]) + old})
        for p in rec["paraphrases"]:
            by_kind[p["kind"]].append({"kind": p["kind"], "id": rec["id"], "prompt": p["prompt"],
                                       "generation": p["generation"], "target": rec["target_new"],
                                       "verdict": verdict(p["generation"], rec["target_new"])})
        for n in rec["neighbours"]:
            state = "unknown" if n["unchanged"] is None else "unchanged" if n["unchanged"] else "changed"
            said = "" if n["answer"] is None else f", answer {verdict(n['generation'], n['answer'])}"
            by_kind["neighbour"].append({"kind": "neighbour", "id": rec["id"], "prompt": n["prompt"],
                                         "generation": n["generation"], "target": n["answer"],
                                         "verdict": state + said})
        for p in rec.get("portability", ()):
            old = f" (old: {verdict(p['generation'], rec['target_true'])})" if rec.get("target_true") else ""
            by_kind[PORTABILITY].append({"kind": PORTABILITY, "id": rec["id"], "prompt": p["prompt"],
                                         "generation": p["generation"], "target": rec["target_new"],
                                         "verdict": verdict(p["generation"], rec["target_new"]) + old})
        if "chat" in rec:
            c = rec["chat"]
            by_kind["chat"].append({"kind": "chat", "id": rec["id"], "prompt": c["question"],
                                    "generation": c["generation"], "target": rec["target_new"],
                                    "verdict": verdict(c["generation"], rec["target_new"])})
    return interleave_samples(by_kind, count, seed=seed)


def interleave_samples(by_kind: Mapping[str, list[dict[str, Any]]], count: int, *, seed: int = 0
                       ) -> list[dict[str, Any]]:
    """Up to ``count`` rows taken in turn from each kind's list (in the mapping's order), each
    list shuffled with one seeded generator first, so every kind shows up in a short sample."""
    rng = random.Random(seed)
    pools = {kind: list(rows) for kind, rows in by_kind.items()}
    for rows in pools.values():
        rng.shuffle(rows)
    out: list[dict[str, Any]] = []
    while len(out) < count and any(pools.values()):
        for rows in pools.values():
            if rows and len(out) < count:
                out.append(rows.pop())
    return out


def _cell(text: Any) -> str:
    return "–" if text is None else str(text).replace("|", "\\|").replace("\n", "⏎")


def format_samples(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sample rows as a Markdown table (one line each)."""
    lines = ["| kind | prompt | generation | target | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {s['kind']} | {_cell(s['prompt'])} | {_cell(s['generation'])} | {_cell(s['target'])} | "
              f"{s['verdict']} |" for s in samples]
    return lines


# the result columns, in the order reports print them: (summary key, column label)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("edit_begins", "says it (edit)"),
    ("paraphrase_begins", "says it (paraphrase)"),
    ("paraphrase_begins_where_answered", "says it (paraphrase it answered unedited)"),
    ("open_mentions", "mentions (rephrase)"),
    ("old_begins", "still says old"),
    ("neighbour_unchanged", "neighbour gen unchanged"),
    ("neighbour_first_word_unchanged", "neighbour 1st word unchanged"),
    ("neighbour_new_mentions", "neighbour says new"),
    ("portability_mentions", "mentions (portability)"),
    ("chat_mentions", "chat says it"),
)
