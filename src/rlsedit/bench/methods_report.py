"""The method benchmark's report: ``results.json`` gathered from the finished runs under
``out``, the markdown table ``results.md``, and the plots (:mod:`rlsedit.bench.plots`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError
from .resume import SETTINGS_FILE, UNEDITED, write_json
from .sweep import run_dir_name

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

NOTES = [
    "edits: the first n records of the data file in file order (settings.shuffle: a seeded shuffle of them); "
    "the same sequence and batches for every method",
    "efficacy/generalization/specificity: ROME success rates (NLL comparison; chance 0.5) on the edits "
    "applied so far; *_acc: teacher-forced top-1 accuracy (chance 1/V)",
    "locality (EasyEdit): per neighbourhood prompt, the share of its answer's tokens whose teacher-forced argmax is "
    "the unedited model's (recorded once: unedited.json locality_pre_edit), averaged over the edits applied so far; "
    "the unedited row compares the model with itself in other batches (a determinism check). Not specificity, and "
    "not neighborhood_acc (accuracy against the answer)",
    "timings: total_s per batch includes validation, value targets, keys, solve and the journal write; "
    "solve_s is the closed-form solve summed over layers (None for FT)",
    "generation columns (settings.gen_n: a seeded sample of the edits, the same for every method and checkpoint): "
    "greedy decoding to '.', a newline or EOS, at most settings.gen_max_new_tokens tokens, SQuAD-normalised; "
    "says it = the continuation begins with the new object; mentions (rephrase) = the new object occurs in the "
    "continuation of an open rephrase prompt (MEND layout); still says old = begins with the old object; neighbour "
    "gen unchanged = the neighbourhood prompt's continuation is identical to the unedited model's (the unedited row: "
    "two decodings of the same model, a determinism check); chat says it = the chat-template answer to the edit "
    "prompt mentions the new object (– where the model has no chat template)",
]


def write_report(out: str | Path, run_names: Sequence[str] | None = None, *,
                 machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gather ``out``'s finished runs into ``results.json``, ``results.md`` and plots.

    ``run_names`` orders the rows (a name without ``result.json`` is reported as not run);
    ``None`` takes every run folder found. Also what ``--report-only`` does for a run that
    was stopped before all methods finished.
    """
    from .plots import plot_method_bench

    out = Path(out)
    if not (out / SETTINGS_FILE).is_file() or not (out / f"{UNEDITED}.json").is_file():
        raise InvalidRequestError(f"{out} holds no benchmark yet (no {SETTINGS_FILE} / {UNEDITED}.json)")
    results: dict[str, Any] = {}
    if run_names is None:
        run_names = sorted(p.parent.name for p in out.glob("*/result.json"))
    for name in run_names:
        path = out / run_dir_name(name) / "result.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    if machine is None:
        machines = [r["machine"] for r in results.values() if "machine" in r]
        machine = machines[0] if machines else {"note": "not recorded"}
    full = {
        "settings": json.loads((out / SETTINGS_FILE).read_text()),
        "runs": list(run_names),
        "unedited": json.loads((out / f"{UNEDITED}.json").read_text()),
        "methods": results,
        "machine": machine,
        "notes": list(NOTES),
    }
    write_json(out / RESULTS_JSON, full)
    (out / RESULTS_MD).write_text(format_results_markdown(full), encoding="utf-8")
    plots = plot_method_bench(full, out)
    log.info("plots: %s", ", ".join(str(p) for p in plots))
    return full


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _final_eval(result: dict[str, Any]) -> dict[str, Any]:
    """The evaluation at the last checkpoint of a method (the end of the stream)."""
    evals = [b["evaluation"] for b in result["batches"] if "evaluation" in b]
    return evals[-1] if evals else {}


def _general_cell(name: str, res: dict[str, Any] | None) -> str:
    if not res:
        return "–"
    if name == "wikitext":
        return _num(res.get("ppl"), "{:.1f}")
    for key in ("acc", "recall", "pass@1"):
        if key in res and isinstance(res[key], (int, float)):
            return _pct(res[key])
    return "–"


def _general_chance(name: str, res: dict[str, Any] | None) -> str:
    if not res or res.get("chance") is None:
        return "–"
    return _num(res["chance"], "{:.0f}") if name == "wikitext" else _pct(res["chance"])


def _retention_oldest(final: dict[str, Any]) -> float | None:
    bins = final.get("retention", {}).get("bins", {}).get("success", [])
    return bins[0]["mean"] if bins else None


def _generation_oldest(generation: dict[str, Any]) -> float | None:
    bins = generation.get("bins", {}).get("edit_begins", [])
    return bins[0]["mean"] if bins else None


def _generation_sample_lines(full: dict[str, Any]) -> list[str]:
    """Each row's generation samples (end of the stream), so a reader can check the scorer."""
    from ..eval.generation import format_samples

    evaluations = []
    if full.get("unedited"):
        evaluations.append((UNEDITED, full["unedited"]["evaluation"]))
    evaluations += [(name, _final_eval(full["methods"][name])) for name in full["runs"] if name in full["methods"]]
    lines: list[str] = []
    for name, evaluation in evaluations:
        samples = evaluation.get("generation", {}).get("samples")
        if samples:
            if not lines:
                lines += ["", "## Generation samples (end of the stream; to check the scorer by eye)"]
            lines += ["", f"### {name}", "", *format_samples(samples)]
    return lines


def format_results_markdown(full: dict[str, Any]) -> str:
    """The paper's table (Efficacy / Generalization / Specificity / Fluency / Consistency),
    plus retention, general capability, cost, and a chance row."""
    settings = full["settings"]
    general = settings.get("general", [])
    from ..eval.generation import COLUMNS as GEN_COLUMNS

    head = ["Method", "Eff.↑", "Gen.↑", "Spe.↑", "Loc. (EasyEdit)↑", "Flu.↑", "Consis.↑", "Ret. oldest↑",
            *[label for _, label in GEN_COLUMNS], "gen. ret. oldest", *[
                ("PPL↓" if g == "wikitext" else f"{g}↑") for g in general], "s/edit", "solve s/batch"]
    lines = [
        f"# Method benchmark: {settings['model']}, {Path(settings['data']).name}, "
        f"N={settings['n']}, batch {settings['batch_size']}",
        "",
        "CounterFact success rates in % at the end of the stream, on all edits applied "
        "(efficacy = rewrite prompt, generalization = paraphrases, specificity = neighborhood prompts). "
        "Loc. (EasyEdit): % of neighbourhood answer tokens whose teacher-forced argmax is the unedited model's. "
        "Ret. oldest: efficacy of the oldest 1/"
        f"{settings.get('retention_bins', 10)} of the edits after the whole stream. "
        "s/edit: wall seconds per edit (targets, keys, solve, journal); solve s/batch: the closed-form "
        "solve alone, mean per batch. Generation columns (beside the teacher-forced ones, see the notes): "
        "% of the sampled edits' generated continuations; gen. ret. oldest: says it (edit) on the oldest "
        f"1/{settings.get('retention_bins', 10)} of the sampled edits after the whole stream.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]

    def row(name: str, evaluation: dict, final: dict, s_edit, solve) -> str:
        summary = evaluation.get("counterfact", {}).get("summary", {})
        gen = final.get("generation", {})
        said = evaluation.get("generation", {})
        general_res = evaluation.get("general", {})
        cells = [name, _pct(summary.get("efficacy")), _pct(summary.get("generalization")),
                 _pct(summary.get("specificity")), _pct(summary.get("locality")), _num(gen.get("fluency"), "{:.2f}"),
                 _num(gen.get("consistency"), "{:.3f}"), _pct(_retention_oldest(final)),
                 *[_pct(said.get("summary", {}).get(key)) for key, _ in GEN_COLUMNS],
                 _pct(_generation_oldest(said)),
                 *[_general_cell(g, general_res.get(g)) for g in general],
                 _num(s_edit, "{:.2f}"), _num(solve, "{:.3f}")]
        return "| " + " | ".join(cells) + " |"

    unedited = full.get("unedited")
    if unedited:
        lines.append(row(f"{UNEDITED} (before editing)", unedited["evaluation"], unedited["final"], None, None))
    for name in full["runs"]:
        result = full["methods"].get(name)
        if result is None:
            lines.append("| " + " | ".join([name] + ["not run"] + ["–"] * (len(head) - 2)) + " |")
            continue
        lines.append(row(name, _final_eval(result), result["final"], result["seconds_per_edit"],
                         result["solve_seconds_per_batch"]))
    ref = unedited["evaluation"] if unedited else {}
    chance = ["chance", "50.0", "50.0", "50.0", "–", "–", "–", "50.0", *["–"] * (len(GEN_COLUMNS) + 1),
              *[_general_chance(g, ref.get("general", {}).get(g)) for g in general], "", ""]
    lines.append("| " + " | ".join(chance) + " |")
    lines += ["", "## Along the stream", "",
              "| Method | edits | Eff. | Gen. | Spe. | Loc. (EasyEdit) | says it (edit) | "
              "says it (para.) / mentions (reph.) | nbr gen unchanged | chat says it | ‖W−W0‖ | anchor residual | "
              "s/edit (batch) | solve s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in full["runs"]:
        result = full["methods"].get(name)
        if result is None:
            continue
        for b in result["batches"]:
            if "evaluation" not in b:
                continue
            s = b["evaluation"].get("counterfact", {}).get("summary", {})
            size = b["edits"] - (result["batches"][b["batch"] - 2]["edits"] if b["batch"] > 1 else 0)
            per_edit = None if b.get("total_s") is None else b["total_s"] / size
            d = b["diagnostics"]
            g = b["evaluation"].get("generation", {}).get("summary", {})
            para = g.get("paraphrase_begins") if g.get("paraphrase_begins") is not None else g.get("open_mentions")
            lines.append(f"| {name} | {b['edits']} | {_pct(s.get('efficacy'))} | {_pct(s.get('generalization'))} | "
                         f"{_pct(s.get('specificity'))} | {_pct(s.get('locality'))} | {_pct(g.get('edit_begins'))} | "
                         f"{_pct(para)} | "
                         f"{_pct(g.get('neighbour_unchanged'))} | {_pct(g.get('chat_mentions'))} | "
                         f"{_num(d.get('drift_fro'), '{:.3g}')} | "
                         f"{_num(d.get('anchor_residual'), '{:.3g}')} | {_num(per_edit)} | "
                         f"{_num(b.get('solve_s'), '{:.3f}')} |")
    lines += _generation_sample_lines(full)
    machine = full.get("machine", {})
    lines += ["", f"Machine: {json.dumps(machine, sort_keys=True)}", ""]
    lines += [f"- {note}" for note in full.get("notes", [])]
    return "\n".join(lines) + "\n"
