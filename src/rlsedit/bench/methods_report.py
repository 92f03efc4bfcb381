"""The method benchmark's report: ``results.json`` gathered from the runs under ``out`` (finished,
stopped, or partial: a run with progress lines but no ``result.json`` yet is reported with the
edits it has done and the date of its last batch), the markdown table ``results.md``, and the
plots (:mod:`rlsedit.bench.plots`)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError
from .timing import times_an_edit, timing_summary
from .resume import SETTINGS_FILE, UNEDITED, UNEDITED_SCORES, read_progress, read_run_name, write_json
from .sweep import run_dir_name

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

NOTES = [
    "edits: the first n records of the data file in file order (settings.shuffle: a seeded shuffle of them); "
    "the same sequence and batches for every method. A checkpoint marked '(after a rebuild ≈D)' descends from "
    "weights that a resumed run rebuilt from the target log (FT: computed again; its session lost, e.g. on a new "
    "machine) and that matched the first run's only within D: the largest relative difference of an edited "
    "layer's ‖W−W0‖ or anchor residual (progress line rebuilt_before). The stream went on from the rebuilt weights",
    "efficacy/generalization/specificity: ROME success rates (NLL comparison; chance 0.5) on the edits "
    "applied so far; *_acc: teacher-forced top-1 accuracy (chance 1/V). Checkpoints since 95b04f5 score them 500 edits "
    "at a time (a stop keeps the parts done): the same as one pass to float rounding",
    "locality (EasyEdit): per neighbourhood prompt, the share of its answer's tokens whose teacher-forced argmax is "
    "the unedited model's (recorded once: unedited.json locality_pre_edit), averaged over the edits applied so far; "
    "the unedited row compares the model with itself in other batches (a determinism check). Not specificity, and "
    "not neighborhood_acc (accuracy against the answer)",
    "timings: total_s per batch includes validation, value targets, keys, solve and the journal write; "
    "solve_s is the closed-form solve summed over layers (None for FT). s/edit and solve s/batch leave out "
    "batches whose value targets, all or some, were replayed from the target log (targets_replayed; ROME resumed "
    "mid-batch: targets_replayed_edits) and are given per device "
    "when batches ran on more than one (machine.device of each progress line), and per CPU model when CPU "
    "batches ran on more than one (machine.cpu)",
    "generation columns (settings.gen_n): at each checkpoint a seeded sample of min(gen_n, edits so far) of the edits "
    "applied, the same for every method (sampled edits: how many; the end of the stream and the unedited row score "
    "the stream's own sample of gen_n; a checkpoint scored on fewer is re-scored by --rescore-generation: "
    "'re-scored' on weights rebuilt bit for bit from the target log, 're-scored ≈D' on weights rebuilt on another "
    "CPU, every edited layer's ‖W−W0‖ and anchor residual within D (relative) of the run's): "
    "greedy decoding to '.', a newline or EOS, at most settings.gen_max_new_tokens tokens, SQuAD-normalised; "
    "says it = the continuation begins with the new object; says it (paraphrase it answered unedited) = the same "
    "over only the paraphrases whose unedited continuation began with the old object; mentions (rephrase) = the new object occurs in the "
    "continuation of an open rephrase prompt (MEND layout); still says old = begins with the old object; neighbour "
    "gen unchanged = the neighbourhood prompt's continuation is identical to the unedited model's (the unedited row: "
    "two decodings of the same model, a determinism check); neighbour 1st word unchanged = only its first "
    "normalised word is; neighbour says new = it mentions the edit's new object (bleed); chat says it = the chat-template answer to the edit "
    "prompt mentions the new object (– where the model has no chat template)",
    "Edits: how far each method got. 'stopped at E edits': settings.stop_below_chance stopped it there (the "
    "efficacy of the batch just applied was below chance, 0.5, at two consecutive checkpoints); 'partial: E of N "
    "edits, DATE': the run is still going or was interrupted (DATE: its last finished batch, UTC). Stopped and "
    "partial rows are scored at their last checkpoint",
    "first-N columns (settings.retention_first): at each checkpoint, efficacy of the first N edits of the stream and "
    "says it (edit prompt, raw, greedy) on a seeded sample of min(settings.gen_n, those applied) of them; last batch: efficacy "
    "of the batch just applied (settings.stop_below_chance)",
]


def _sample_sizes(evaluation: dict[str, Any], first_n: int | None) -> str:
    """How many edits the checkpoint's generation columns scored ('–' without them), with
    ``first_n`` how many of the first edits its *says it first N* did, and whether
    ``--rescore-generation`` scored them on rebuilt weights (with the tolerance it used, how close)."""
    gen = (evaluation.get("generation") or {}).get("counts", {}).get("edits")
    text = "–" if gen is None else f"{gen:,}"
    if first_n:
        first = ((evaluation.get("retention_first") or {}).get("generation") or {}).get("edits")
        text += " (–)" if first is None else f" ({first:,})"
    rescored = evaluation.get("generation_rescored")
    if rescored:
        weights = rescored.get("weights") or {"identical": True}  # rescores before the tolerance were bit for bit
        text += ", re-scored" if weights.get("identical") else f", re-scored ≈{weights['layer_rel_diff']:.1e}"
    return text


def _inexact_rebuild(rebuilt: dict[str, Any] | None, so_far: float | None) -> float | None:
    """The largest layer difference of the rebuilds a run's weights descend from that did not
    match their first run bit for bit (``so_far``: the earlier ones'), or None while every one did.
    ``rebuilt`` is a progress line's ``rebuilt_before``; the difference carries to every later line."""
    if not rebuilt or rebuilt.get("identical") == rebuilt.get("checked"):
        return so_far
    diff = rebuilt.get("max_layer_rel_diff")
    diff = float("nan") if diff is None else diff
    return diff if so_far is None else max(so_far, diff)


def partial_result(folder: Path, n: int, first_device: str | None = None) -> dict[str, Any] | None:
    """A run without ``result.json`` as far as its ``progress.jsonl`` goes (``None`` without any
    line): its batches, timings, and ``partial = {edits_done, of, date}``."""
    path = folder / "progress.jsonl"
    records = sorted(read_progress(path), key=lambda r: r["batch"])
    if not records:
        return None
    stamp = records[-1].get("finished_at")
    date = stamp[:10] if stamp else \
        datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).date().isoformat()  # lines written before dates
    partial = {"batches": records, "final": {}, "status": {"edits_applied": records[-1]["edits"]},
               **timing_summary(records, first_device), "partial": {"edits_done": records[-1]["edits"], "of": n, "date": date}}
    if "machine" in records[-1]:  # progress lines name the machine and code from 2026-12-03 on
        partial["machine"] = records[-1]["machine"]
    return partial


def write_report(out: str | Path, run_names: Sequence[str] | None = None, *,
                 machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gather ``out``'s finished runs into ``results.json``, ``results.md`` and plots.

    ``run_names`` come first, in order (a name without ``result.json`` is reported as partial when
    its ``progress.jsonl`` has lines, else as not run); every other run folder found follows, so
    a process that ran some of ``out``'s methods never drops the others' rows. Also what
    ``--report-only`` does while methods are still running or after a run was killed.
    """
    from .plots import plot_method_bench

    out = Path(out)
    if not (out / SETTINGS_FILE).is_file() or not (out / f"{UNEDITED}.json").is_file():
        raise InvalidRequestError(f"{out} holds no benchmark yet (no {SETTINGS_FILE} / {UNEDITED}.json)")
    settings = json.loads((out / SETTINGS_FILE).read_text())
    results: dict[str, Any] = {}
    named = list(run_names or [])
    found = sorted({p.parent for pattern in ("*/result.json", "*/progress.jsonl") for p in out.glob(pattern)})
    named_dirs = {run_dir_name(name) for name in named}
    run_names = named + [read_run_name(folder) for folder in found if folder.name not in named_dirs]
    for name in run_names:
        folder = out / run_dir_name(name)
        if (folder / "result.json").is_file():
            results[name] = json.loads((folder / "result.json").read_text())
            # derived from the batches, so a report applies today's rule to older runs too
            results[name].update(timing_summary(results[name]["batches"], settings.get("device")))
        else:
            partial = partial_result(folder, settings["n"], settings.get("device"))
            if partial is not None:
                results[name] = partial
    if machine is None:
        machines = [r["machine"] for r in results.values() if "machine" in r]
        machine = machines[0] if machines else {"note": "not recorded"}
    full = {
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "runs": list(run_names),
        "unedited": _scored_unedited(out),
        "methods": results,
        "machine": machine,
        "notes": list(NOTES),
    }
    write_json(out / RESULTS_JSON, full)
    (out / RESULTS_MD).write_text(format_results_markdown(full), encoding="utf-8")
    plots = plot_method_bench(full, out)
    log.info("plots: %s", ", ".join(str(p) for p in plots))
    return full


def _scored_unedited(out: Path) -> dict[str, Any] | None:
    """``unedited.json`` once its own scores are written (its last stage), else ``None``: a report
    while they are still running has no unedited row yet."""
    unedited = json.loads((out / f"{UNEDITED}.json").read_text())
    return unedited if all(key in unedited for key in UNEDITED_SCORES) else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _timing_cells(result: dict[str, Any]) -> tuple[str, str]:
    """The s/edit and solve s/batch cells: one figure, or one per device when batches ran on several
    ('3.05 (cpu) · 0.44 (cuda)')."""
    by_device = result.get("by_device") or {}
    if len(by_device) < 2:
        return _num(result.get("seconds_per_edit"), "{:.2f}"), _num(result.get("solve_seconds_per_batch"), "{:.3f}")
    return tuple(" · ".join(f"{_num(t[key], fmt)} ({device})" for device, t in by_device.items())
                 for key, fmt in (("seconds_per_edit", "{:.2f}"), ("solve_seconds_per_batch", "{:.3f}")))


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


def _edits_cell(result: dict[str, Any]) -> str:
    """How far a method got: its edit count, where it stopped, or how far a partial run is."""
    stopped = result.get("stopped")
    if stopped:
        return f"stopped at {stopped['at_edits']:,} edits ({stopped['reason']})"
    scored = [b["edits"] for b in result["batches"] if "evaluation" in b]
    partial = result.get("partial")
    if partial:
        text = f"partial: {partial['edits_done']:,} of {partial['of']:,} edits, {partial['date']}"
        if partial["edits_done"] == partial["of"]:
            text += "; end-of-stream scores pending"
        if not scored:
            return text + "; no checkpoint yet"
        return text + ("" if scored[-1] == partial["edits_done"] else f"; scores at {scored[-1]:,}")
    return f"{result['batches'][-1]['edits']:,}" if result["batches"] else "–"


def _first_n(evaluation: dict[str, Any]) -> tuple[float | None, float | None]:
    """Efficacy and generation says-it of the first edits (settings.retention_first) at a checkpoint."""
    first = evaluation.get("retention_first") or {}
    return first.get("efficacy"), (first.get("generation") or {}).get("edit_begins")


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
    first_n = settings.get("retention_first", 0)
    last_batch = settings.get("stop_below_chance", False)
    from ..eval.generation import COLUMNS as GEN_COLUMNS

    first_head = [f"Eff. first {first_n:,}↑", f"says it first {first_n:,}↑"] if first_n else []
    head = ["Method", "Edits", "Eff.↑", "Gen.↑", "Spe.↑", "Loc. (EasyEdit)↑", "Flu.↑", "Consis.↑", "Ret. oldest↑",
            *first_head, *[label for _, label in GEN_COLUMNS], "gen. ret. oldest", *[
                ("PPL↓" if g == "wikitext" else f"{g}↑") for g in general], "s/edit", "solve s/batch"]
    lines = [
        f"# Method benchmark: {settings['model']}, {Path(settings['data']).name}, "
        f"N={settings['n']}, batch {settings['batch_size']}",
        "",
        *([f"Report written {full['written_at'][:10]} (UTC).", ""] if full.get("written_at") else []),
        "CounterFact success rates in % at the end of the stream (Edits: how far each method got; a stopped or "
        "partial method is scored at its last checkpoint), on all edits applied "
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

    def row(name: str, edits: str, evaluation: dict, final: dict, s_edit: str, solve: str) -> str:
        summary = evaluation.get("counterfact", {}).get("summary", {})
        gen = final.get("generation", {})
        said = evaluation.get("generation", {})
        general_res = evaluation.get("general", {})
        first = [_pct(v) for v in _first_n(evaluation)] if first_n else []
        cells = [name, edits, _pct(summary.get("efficacy")), _pct(summary.get("generalization")),
                 _pct(summary.get("specificity")), _pct(summary.get("locality")), _num(gen.get("fluency"), "{:.2f}"),
                 _num(gen.get("consistency"), "{:.3f}"), _pct(_retention_oldest(final)), *first,
                 *[_pct(said.get("summary", {}).get(key)) for key, _ in GEN_COLUMNS],
                 _pct(_generation_oldest(said)),
                 *[_general_cell(g, general_res.get(g)) for g in general],
                 s_edit, solve]
        return "| " + " | ".join(cells) + " |"

    unedited = full.get("unedited")
    if unedited:
        lines.append(row(f"{UNEDITED} (before editing)", "0", unedited["evaluation"], unedited["final"], "–", "–"))
    for name in full["runs"]:
        result = full["methods"].get(name)
        if result is None:
            lines.append("| " + " | ".join([name] + ["not run"] + ["–"] * (len(head) - 2)) + " |")
            continue
        lines.append(row(name, _edits_cell(result), _final_eval(result), result["final"],
                         *_timing_cells(result)))
    ref = unedited["evaluation"] if unedited else {}
    chance = ["chance", "", "50.0", "50.0", "50.0", "–", "–", "–", "50.0", *(["50.0", "–"] if first_n else []),
              *["–"] * (len(GEN_COLUMNS) + 1),
              *[_general_chance(g, ref.get("general", {}).get(g)) for g in general], "", ""]
    lines.append("| " + " | ".join(chance) + " |")
    extra_head = [f"Eff. first {first_n:,}", f"says it first {first_n:,}"] if first_n else []
    extra_head += ["Eff. last batch"] if last_batch else []
    sample_head = f"sampled edits (of first {first_n:,})" if first_n else "sampled edits"
    trajectory_head = ["Method", "edits", "Eff.", "Gen.", "Spe.", "Loc. (EasyEdit)", *extra_head, sample_head,
                       "says it (edit)",
                       "says it (para.) / mentions (reph.)", "nbr gen unchanged", "chat says it", "‖W−W0‖",
                       "anchor residual", "s/edit (batch)", "solve s"]
    lines += ["", "## Along the stream", "",
              "edits: the actual edit count of each checkpoint (a checkpoint asked at a count that is not a multiple "
              "of the batch size is evaluated after the batch that reaches it: '1,020 (asked 1,000)').", "",
              "| " + " | ".join(trajectory_head) + " |",
              "|" + "|".join(["---"] + ["---:"] * (len(trajectory_head) - 1)) + "|"]
    for name in full["runs"]:
        result = full["methods"].get(name)
        if result is None:
            continue
        previous = 0
        inexact = None  # the largest difference of an earlier rebuild that was not bit for bit
        for b in sorted(result["batches"], key=lambda r: r["batch"]):
            size, previous = b["edits"] - previous, b["edits"]
            inexact = _inexact_rebuild(b.get("rebuilt_before"), inexact)
            if "evaluation" not in b:
                continue
            s = b["evaluation"].get("counterfact", {}).get("summary", {})
            per_edit = b["total_s"] / size if times_an_edit(b) else None
            d = b["diagnostics"]
            g = b["evaluation"].get("generation", {}).get("summary", {})
            para = g.get("paraphrase_begins") if g.get("paraphrase_begins") is not None else g.get("open_mentions")
            asked = [a for a in b.get("checkpoint_for", []) if a != b["edits"]]
            edits = f"{b['edits']:,}" + (f" (asked {', '.join(f'{a:,}' for a in asked)})" if asked else "")
            edits += "" if inexact is None else f" (after a rebuild ≈{inexact:.1e})"
            extra = [_pct(v) for v in _first_n(b["evaluation"])] if first_n else []
            extra += [_pct(b["evaluation"].get("last_batch_efficacy"))] if last_batch else []
            cells = [name, edits, _pct(s.get("efficacy")), _pct(s.get("generalization")), _pct(s.get("specificity")),
                     _pct(s.get("locality")), *extra, _sample_sizes(b["evaluation"], first_n),
                     _pct(g.get("edit_begins")), _pct(para),
                     _pct(g.get("neighbour_unchanged")), _pct(g.get("chat_mentions")),
                     _num(d.get("drift_fro"), "{:.3g}"), _num(d.get("anchor_residual"), "{:.3g}"), _num(per_edit),
                     _num(b.get("solve_s"), "{:.3f}")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _generation_sample_lines(full)
    machine = full.get("machine", {})
    lines += ["", f"Machine: {json.dumps(machine, sort_keys=True)}", ""]
    lines += [f"- {note}" for note in full.get("notes", [])]
    return "\n".join(lines) + "\n"
