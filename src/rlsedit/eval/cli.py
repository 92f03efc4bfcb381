"""``rlsedit eval``: score an edited model (a state directory) or a base model on chosen suites.

Suites (``--suites``, comma-separated):

* ``counterfact`` — efficacy / generalization / specificity of the first ``--n`` records of
  ``--data`` (any layout :func:`rlsedit.requests.read_requests` reads); ``--fluency`` and
  ``--consistency`` add the generation metrics;
* ``zsre`` — MEND/EasyEdit token accuracies of the records of ``--zsre-data`` (default ``--data``)
  under ``--zsre-convention``: ``memit`` (toward ``answers[0]``, ``"?"`` after locality prompts; the
  default) or ``easyedit`` (toward ``alt``). For ``--state`` the state's journal tells which one its
  edits followed (``rlsedit edit`` writes a MEND record toward ``alt``, with ``--zsre-convention
  memit`` toward ``answers[0]``): that one is used, and naming the other is refused;
* ``retention`` — the forgetting curve: efficacy of every edit in the state's journal, in the
  order applied (needs ``--state``);
* general capability from ``--data-dir`` (default: the ``RLSEDIT_DATA_DIR`` environment variable):
  ``ppl`` (WikiText-2 perplexity), ``knowns``, ``glue`` (every GLUE subset) or one subset
  (``sst2``, ``mrpc``, ``cola``, ``rte``, ``nli``, ``sentiment_analysis``, ``dialogue``,
  ``glue_mmlu``), ``mmlu``, ``gsm8k``, ``humaneval``.

Beside the teacher-forced figures, counterfact and zsre report generation metrics (unless
``--no-generation``): does the model *say* the new fact when it generates greedily (edit prompt,
paraphrases, chat template), does it still say the old one, and are its neighbourhood
continuations identical to the unedited model's (for ``--state`` decoded once on the state's
unedited weights ``W_0``, put back for the time of it). ``--gen-n`` scores a seeded sample of the edits; 30 (prompt, generation,
verdict) rows are printed so the scorer can be checked by eye.

``--multihop FILE`` asks the multi-hop questions of an MQuAKE-layout file (its first ``--n``
cases), raw and through the chat template, and scores whether the answers mention the new answer
(:mod:`rlsedit.eval.multihop`). Evaluation applies none of the file's rewrites: pass a ``--state``
edited with them (``rlsedit edit --edits FILE`` reads the same file). Without ``--data``,
``--suites`` then defaults to none.

Counterfact and zsre also report EasyEdit's ``locality``: the share of neighbourhood answer tokens
whose teacher-forced argmax is the unedited model's. The unedited argmaxes are recorded first, for
``--state`` on the state's unedited weights W_0, put back for the time of the recording
(``neighborhood_acc`` / ``locality_answer_acc`` are accuracy against the answer, another number).

Scored-choice suites use a seeded sample of ``--general-n`` items; GSM8K and HumanEval the
first ``--limit`` problems. Every figure is printed beside its chance level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from ..errors import InvalidRequestError

EDIT_SUITES = ("counterfact", "zsre", "retention")


def _names(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def split_suites(suites) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(edit suites, general suite names as run_eval knows them)``; unknown names raise."""
    from .runner import general_suite_names

    edit = tuple(s for s in suites if s in EDIT_SUITES)
    general = general_suite_names([s for s in suites if s not in EDIT_SUITES])
    return edit, general


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate an edited model (state directory) or a base model on chosen suites",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--state", help="state directory of an editing session (the edited model)")
    source.add_argument("--model", help="a model spec to evaluate unedited (smollm2, gemma3-270m, a path)")
    p.add_argument("--data", help="edit records for counterfact (and zsre unless --zsre-data)")
    p.add_argument("--zsre-data", help="zsRE records (MEND layout); default --data")
    p.add_argument("--n", type=int, default=None, help="use only the first N records of --data / --zsre-data")
    from .zsre import CONVENTIONS, DEFAULT_CONVENTION

    p.add_argument("--zsre-convention", choices=CONVENTIONS, default=None,
                   help="zsre: memit (edit toward answers[0], '?' after locality prompts) or easyedit (toward alt); "
                        f"default: the --state's own, else {DEFAULT_CONVENTION}")
    p.add_argument("--suites", type=_names, default=None,
                   help="comma-separated: counterfact, zsre, retention, ppl, knowns, glue, mmlu, gsm8k, humaneval, … "
                        "(default counterfact; none with --multihop and no --data)")
    p.add_argument("--general-n", type=int, default=200, help="items per scored-choice suite (seeded sample; default 200)")
    p.add_argument("--gsm8k-limit", "--limit", dest="limit", type=int, default=None,
                   help="GSM8K/HumanEval: the first N problems (default all; --limit is the old name)")
    p.add_argument("--ppl-tokens", type=int, default=20_000, help="WikiText-2 tokens for perplexity (default 20000)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation cap for GSM8K/HumanEval")
    p.add_argument("--fluency", action="store_true", help="counterfact: fluency (generates text)")
    p.add_argument("--consistency", action="store_true", help="counterfact: consistency against the corpus reference")
    p.add_argument("--retention-bins", type=int, default=10, help="bins of the forgetting curve (default 10)")
    p.add_argument("--data-dir", default=None,
                   help="folder of the general suites' data files (default: $RLSEDIT_DATA_DIR); "
                        "an error names each missing file and where its public copy lives")
    p.add_argument("--eval-batch-size", "--batch-size", dest="batch_size", type=int, default=16,
                   help="prompts per forward pass (default 16; --batch-size is the old name)")
    p.add_argument("--seed", type=int, default=0, help="seed of samples and sampled generations")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/rlsedit)")
    p.add_argument("--no-generation", action="store_true",
                   help="counterfact/zsre: skip the generation metrics (greedy decoding of every prompt)")
    p.add_argument("--gen-n", type=int, default=None, help="generation metrics on a seeded sample of N edits (default all)")
    p.add_argument("--gen-max-new-tokens", type=int, default=12, help="token cap of each generated continuation (default 12)")
    p.add_argument("--gen-chat", choices=("auto", "yes", "no"), default="auto",
                   help="also ask through the chat template: auto (when the model has one), yes (error without one), no")
    p.add_argument("--multihop", metavar="FILE", default=None,
                   help="ask the multi-hop questions of an MQuAKE-layout FILE (its first --n cases), raw and through the "
                        "chat template; its rewrites are not applied: evaluate a --state edited with them "
                        "(rlsedit edit --edits FILE)")
    p.add_argument("--progress", action="store_true", help="show a progress bar over the suites (default: when "
                   "stderr is a terminal; -q hides it)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_eval)


def journal_requests(session) -> list:
    """The live edits of a session in the order they were applied (journal order, then column)."""
    from ..requests import parse_request

    by_seq: dict[int, list] = {}
    for edit_id, (seq, column) in session.index.items():
        by_seq.setdefault(seq, []).append((column, edit_id))
    out = []
    for seq in sorted(by_seq):
        entry = session.store.read_entry(seq)
        records = {str(r["id"]): r for r in entry.meta["requests"]}
        for column, edit_id in sorted(by_seq[seq]):
            out.append(parse_request(records[edit_id], len(out)))
    return out


def check_args(args) -> tuple[tuple[str, ...], tuple[str, ...], list | None]:
    """Refuse bad options before any model is loaded; returns ``split_suites(args.suites)`` and the
    cases of ``--multihop`` (None without it), read once here so a bad file fails first."""
    if args.suites is None:  # the default: counterfact, unless only the multi-hop questions are asked for
        args.suites = () if getattr(args, "multihop", None) and not args.data else ("counterfact",)
    edit, general = split_suites(args.suites)
    if "counterfact" in edit and not args.data:
        raise InvalidRequestError("the counterfact suite needs --data FILE (edit records)")
    if "zsre" in edit and not (args.data or args.zsre_data):
        raise InvalidRequestError("the zsre suite needs --data or --zsre-data FILE")
    if "retention" in edit and args.state is None:
        raise InvalidRequestError("the retention suite needs --state (it scores the journal's edits)")
    from .runner import data_file, default_data_dir

    if args.data_dir is None:
        args.data_dir = default_data_dir()
    for name in general + (("corpus",) if args.consistency else ()):
        data_file(args.data_dir, name)  # a missing file fails before any model loads
    for name in ("n", "general_n", "limit", "ppl_tokens", "retention_bins", "batch_size", "max_new_tokens", "gen_n",
                 "gen_max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive, got {value}")
    multihop = None
    if getattr(args, "multihop", None):
        from .multihop import read_multihop

        multihop = read_multihop(args.multihop, limit=args.n)
    return edit, general, multihop


def generation_configs(args, edit_suites) -> dict[str, Any]:
    """The generation metrics' settings of each edit suite of ``args`` (none with ``--no-generation``);
    the paraphrase kind comes from each suite's data file layout."""
    from ..eval.generation import GenerationConfig, paraphrase_kind_of_file

    if getattr(args, "no_generation", False):
        return {}
    paths = {"counterfact": args.data, "zsre": args.zsre_data or args.data}
    chat = {"auto": None, "yes": True, "no": False}[getattr(args, "gen_chat", "auto")]
    return {suite: GenerationConfig(max_new_tokens=getattr(args, "gen_max_new_tokens", 12),
                                    n=getattr(args, "gen_n", None), seed=args.seed, chat=chat,
                                    paraphrase_kind=paraphrase_kind_of_file(paths[suite]),
                                    batch_size=args.batch_size)
            for suite in ("counterfact", "zsre") if suite in edit_suites}


def multihop_config(args):
    """The settings of the multi-hop questions (``--multihop``): the generation flags of ``args``."""
    from ..eval.generation import GenerationConfig

    chat = {"auto": None, "yes": True, "no": False}[getattr(args, "gen_chat", "auto")]
    return GenerationConfig(max_new_tokens=getattr(args, "gen_max_new_tokens", 12), n=getattr(args, "gen_n", None),
                            seed=args.seed, chat=chat, batch_size=args.batch_size)


def evaluate_model(lm, args, *, session=None) -> dict[str, Any]:
    """Run the suites of ``args`` on ``lm``; ``session`` provides the journal for ``retention``.

    The references of both localities — the neighbourhood continuations (generation) and the
    teacher-forced argmaxes (EasyEdit) before editing — come from the session's unedited weights
    ``W_0``, put back for the time of recording them (:func:`rlsedit.eval.pre_edit.unedited_weights`);
    without a session, from ``lm`` itself (an unedited model compared with itself).
    """
    from ..eval.generation import pre_edit_generations
    from ..eval.pre_edit import pre_edit_locality, unedited_weights
    from ..eval.retention import forgetting_curve
    from ..eval.zsre import resolve_convention, zsre_requests
    from ..eval.runner import run_eval
    from ..requests import read_requests

    edit, general, multihop = check_args(args)
    counterfact = read_requests(args.data, limit=args.n) if "counterfact" in edit else None
    zsre = read_requests(args.zsre_data or args.data, limit=args.n) if "zsre" in edit else None
    generation = generation_configs(args, edit)
    # score zsRE under the convention the state's edits followed (its journal has their targets)
    edited = {r.id: r for r in journal_requests(session)} if zsre and session is not None else None
    convention = resolve_convention(getattr(args, "zsre_convention", None), zsre or (), edited)
    requests = {"counterfact": counterfact, "zsre": zsre_requests(zsre, convention) if zsre else None}
    with unedited_weights(session) if session is not None else contextlib.nullcontext(lm) as base:
        pre_edit = {suite: pre_edit_generations(base, requests[suite], cfg)
                    for suite, cfg in generation.items() if requests[suite]}
        locality = pre_edit_locality(base, counterfact=counterfact, zsre=zsre, zsre_convention=convention,
                                     batch_size=args.batch_size)
    result = run_eval(lm, counterfact=counterfact, zsre=zsre, general=general, data_dir=args.data_dir,
                      n=args.general_n, limit=args.limit, ppl_tokens=args.ppl_tokens, batch_size=args.batch_size,
                      seed=args.seed, fluency=args.fluency, consistency=args.consistency,
                      max_new_tokens=args.max_new_tokens, generation=generation, pre_edit_generations=pre_edit,
                      pre_edit_locality=locality, zsre_convention=convention,
                      multihop=multihop, multihop_config=multihop_config(args) if multihop else None,
                      progress=getattr(args, "progress", False))
    if "retention" in edit:
        if session is None:
            raise InvalidRequestError("the retention suite needs --state (it scores the journal's edits)")
        applied = journal_requests(session)
        if not applied:
            raise InvalidRequestError("retention: the state has no live edits yet")
        curve = forgetting_curve(lm, applied, n_bins=args.retention_bins, batch_size=args.batch_size)
        result["retention"] = {"edits": len(applied), "bins": curve["bins"], "chance": curve["chance"]}
    return result


def format_eval(result: dict[str, Any]) -> str:
    """Human-readable lines: each figure with its chance level."""
    lines = []
    for suite in ("counterfact", "zsre"):
        if suite in result:
            summary, chance = result[suite]["summary"], result[suite].get("chance", {})
            for key, value in summary.items():
                if isinstance(value, float):
                    extra = f"   (chance {chance[key]:.4g})" if key in chance else ""
                    lines.append(f"{suite}.{key}: {value:.4f}{extra}")
            if suite == "zsre":
                lines.append(f"zsre.convention: {result[suite]['convention']}")
    for name, res in result.get("general", {}).items():
        for key in ("ppl", "acc", "recall", "pass@1"):
            if isinstance(res.get(key), (int, float)):
                lines.append(f"{name}.{key}: {res[key]:.4f}   (chance {res.get('chance')}; n={res.get('n', '-')})")
    lines += format_generation(result.get("generation", {}))
    if "multihop" in result:
        from ..eval.multihop import format_multihop

        lines += format_multihop(result["multihop"])
    if "retention" in result:
        for b in result["retention"]["bins"]["success"]:
            mean = "–" if b["mean"] is None else f"{b['mean']:.3f}"
            lines.append(f"retention edits {b['first']}-{b['last']}: {mean}   (chance 0.5)")
    if result.get("nonfinite"):
        lines.append("non-finite (written as null): " + ", ".join(result["nonfinite"]))
    return "\n".join(lines)


def format_generation(by_suite: dict[str, Any]) -> list[str]:
    """The generation metrics of each suite, then its sample rows as a Markdown table."""
    from ..eval.generation import COLUMNS, format_samples

    lines: list[str] = []
    for suite, res in by_suite.items():
        counts = res["counts"]
        convention = f"zsRE convention {res['convention']!r}; " if "convention" in res else ""
        lines.append(f"{suite} generation ({counts['edits']} of {counts['edits_total']} edits; {convention}"
                     f"paraphrases scored as {res['settings']['paraphrase_kind']!r}):")
        for key, label in COLUMNS:
            value = res["summary"].get(key)
            lines.append(f"  {label}: " + ("–" if value is None else f"{value:.4f}"))
        lines += [f"  note: {note}" for note in res["notes"]]
        lines += ["", f"{suite} generation samples:", *format_samples(res["samples"]), ""]
    return lines


def cmd_eval(args: argparse.Namespace) -> int:
    check_args(args)
    if args.state is not None:
        from ..session.session import Runtime, Session

        session = Session.open(args.state, runtime=Runtime(device=args.device, cache_dir=args.cache_dir),
                               read_only=True)
        try:
            result = evaluate_model(session.lm, args, session=session)
            result["state"] = {"dir": args.state, "method": session.store.meta["method"],
                               "model": session.store.meta["model"]["spec"], "edits_applied": len(session.index)}
        finally:
            session.close(snapshot=False)  # evaluation only reads the state
    else:
        from ..model.load import load_model

        lm = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
        result = evaluate_model(lm, args)
        result["state"] = {"model": args.model, "edits_applied": 0}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_eval(result))
    return 0
