"""What a long stream of the method benchmark needs (issue 25's 10,000-edit run), on a tiny random
model: checkpoints at given edit counts, retention of the first edits, the collapse stop, and a
report of a run that is not finished yet."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from rlsedit.bench.edit_stream import (below_chance_twice, checkpoint_batches_at_edits, checkpoint_plan,
                                       collapse_stop, select_edits)
from rlsedit.bench.methods import run_method_bench
from rlsedit.bench.methods_config import MethodBenchConfig
from rlsedit.bench.methods_report import write_report
from rlsedit.bench.resume import bench_settings, check_or_write_settings
from rlsedit.errors import InvalidRequestError, StateMismatchError
from test_bench_methods import EDITS, _config, run_killed_at_edit, tiny_setup  # noqa: F401 (a fixture)
from locate_tiny import make_lm

# a fifth edit (words the tiny tokenizer has seen) so that n=5 in batches of 2 ends with a short batch
FIVE = EDITS + [{"id": "e4", "prompt": "{} speaks", "subject": "Toko Yasuda", "target_new": "French",
                 "target_true": "Swedish", "paraphrases": ["The language of Toko Yasuda is"],
                 "neighborhood": ["Sweden speaks"], "neighborhood_answers": ["Swedish"]}]
STOPPED_ROW = "stopped at 4 edits (last-batch efficacy below chance at two checkpoints)"


@pytest.fixture(scope="module")
def setup(tiny_setup) -> dict:
    """The tiny model and files of test_bench_methods, with a five-edit stream."""
    data = tiny_setup["root"] / "five-edits.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in FIVE))
    return dict(tiny_setup, data=data)


def _long_config(setup, **changes) -> MethodBenchConfig:
    """n=5 in batches of 2 (batches end at 2, 4, 5 edits), checkpoints asked at 1, 3 and 5 edits."""
    base = dict(methods=("rlsedit", "ft"), n=5, general=(), checkpoints=4, checkpoint_edits=(1, 3, 5),
                retention_first=4, stop_below_chance=True, retention_bins=3)
    base.update(changes)
    return _config(setup, **base)


# ---- pieces -----------------------------------------------------------------------------------

def test_checkpoint_edit_counts_map_to_the_batch_that_reaches_them():
    # n=10 in batches of 4: batches end at 4, 8, 10 edits
    assert checkpoint_batches_at_edits(10, 4, (5, 10)) == {2: [5], 3: [10]}
    assert checkpoint_batches_at_edits(10, 4, (4, 3)) == {1: [3, 4], 3: []}  # the last batch is always one
    assert checkpoint_batches_at_edits(10, 4, (9,)) == {3: [9]}  # reached only by the short last batch
    plan = checkpoint_plan(10_000, 100, 4, (500, 1_000, 2_000, 5_000, 10_000))
    assert plan == {5: [500], 10: [1_000], 20: [2_000], 50: [5_000], 100: [10_000]}
    assert list(checkpoint_plan(10_000, 100, 4, (1_020,))) == [11, 100]  # 1,020 is reached at 1,100 edits
    assert checkpoint_plan(10, 4, 2) == {2: [], 3: []}  # no counts: evenly spaced as before
    for bad in ((11,), (0,), (-3,)):
        with pytest.raises(InvalidRequestError):
            checkpoint_batches_at_edits(10, 4, bad)


def test_checkpoint_edits_are_checked_in_the_config():
    assert MethodBenchConfig(n=100, checkpoint_edits=(50, 10, 50)).checkpoint_edits == (10, 50)
    with pytest.raises(InvalidRequestError, match="beyond the stream's n=100"):
        MethodBenchConfig(n=100, checkpoint_edits=(50, 101))
    with pytest.raises(InvalidRequestError, match="checkpoints=3 and checkpoint_edits"):
        MethodBenchConfig(n=100, checkpoints=3, checkpoint_edits=(50,))
    with pytest.raises(InvalidRequestError, match="retention_first"):
        MethodBenchConfig(n=100, retention_first=101)
    with pytest.raises(InvalidRequestError, match="retention_first"):
        MethodBenchConfig(n=100, retention_first=-1)


def test_the_collapse_rule_needs_two_consecutive_lows():
    assert below_chance_twice([0.4, 0.3])
    assert below_chance_twice([0.9, 0.4, 0.3])
    assert not below_chance_twice([0.4, 0.6, 0.3])
    assert not below_chance_twice([0.3])
    assert not below_chance_twice([0.5, 0.4])  # chance itself is not below chance
    assert not below_chance_twice([None, 0.3])

    def rec(batch, efficacy=None, evaluated=True):
        out = {"batch": batch, "edits": 100 * batch}
        if evaluated:
            out["evaluation"] = {"last_batch_efficacy": efficacy}
        return out

    # batches without a checkpoint do not break a run of lows; the stop is at the second low
    records = [rec(1, 0.9), rec(2, 0.4), rec(3, evaluated=False), rec(4, 0.2), rec(5, 0.1)]
    assert collapse_stop(records) == {"at_edits": 400, "at_batch": 4, "reason": STOPPED_ROW.split("(")[1][:-1],
                                      "last_batch_efficacy": [0.4, 0.2]}
    assert collapse_stop([rec(1, 0.4), rec(2, 0.6), rec(3, 0.3)]) is None


def test_the_new_settings_are_pinned_only_when_set(setup, tmp_path):
    requests = select_edits(setup["data"], 5)
    plain = bench_settings(_config(setup, n=5), requests, ())
    assert not {"checkpoint_edits", "retention_first", "stop_below_chance"} & set(plain)  # old runs still resume
    long = bench_settings(_long_config(setup), requests, ())
    assert long["checkpoint_edits"] == [1, 3, 5] and long["retention_first"] == 4 and long["stop_below_chance"]
    check_or_write_settings(tmp_path, long)
    check_or_write_settings(tmp_path, json.loads(json.dumps(long)))  # the same, through JSON: accepted
    for changes, named in (({"checkpoint_edits": (2, 5)}, "checkpoint_edits"),
                           ({"checkpoint_edits": (), "checkpoints": 3}, "checkpoint_edits, checkpoints"),
                           ({"retention_first": 3}, "retention_first"),
                           ({"stop_below_chance": False}, "stop_below_chance")):
        with pytest.raises(StateMismatchError, match=f"other settings \\({named}\\)"):
            check_or_write_settings(tmp_path, bench_settings(_long_config(setup, **changes), requests, ()))


def test_the_cli_takes_the_new_options_and_refuses_both_checkpoint_kinds(setup, monkeypatch, capsys):
    from rlsedit import cli
    from rlsedit.bench import methods_cli

    seen = []

    def fake_run(config, out, progress=False):
        seen.append(config)
        return {"settings": {"model": config.model, "data": config.data, "n": config.n,
                             "batch_size": config.batch_size, "general": []},
                "runs": [], "methods": {}, "unedited": None}

    monkeypatch.setattr(methods_cli, "run_method_bench", fake_run)
    args = ["--model", "m", "--data", str(setup["data"]), "--out", "o", "--n", "5000"]
    assert cli.main(["bench", "methods", *args, "--checkpoint-at", "500,1000,2000,5000", "--retention-first",
                     "1000", "--stop-below-chance"]) == 0
    assert seen[0].checkpoint_edits == (500, 1000, 2000, 5000)
    assert seen[0].retention_first == 1000 and seen[0].stop_below_chance is True
    assert cli.main(["bench", "methods", *args]) == 0  # unset: off
    assert seen[1].checkpoint_edits == () and seen[1].retention_first == 0 and seen[1].stop_below_chance is False
    capsys.readouterr()
    assert cli.main(["bench", "methods", *args, "--checkpoints", "4", "--checkpoint-at", "500"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoints" in err and "--checkpoint-at" in err
    assert cli.main(["bench", *args, "--checkpoints", "2", "--checkpoint-at", "500"]) == 2  # the group's copy too
    assert len(seen) == 2


def test_last_batch_efficacy_is_the_rewrite_success_rate():
    from rlsedit.bench.methods_eval import last_batch_efficacy
    from rlsedit.eval.retention import forgetting_curve
    from rlsedit.requests import parse_request

    lm = make_lm("llama", n_layers=8)
    batch = [parse_request(e) for e in FIVE]
    value = last_batch_efficacy(lm, batch, MethodBenchConfig(eval_batch_size=2))
    per_edit = forgetting_curve(lm, batch, n_bins=1)["per_edit"]
    assert value == pytest.approx(sum(e["success"] for e in per_edit) / len(per_edit))
    assert last_batch_efficacy(lm, [], MethodBenchConfig()) is None


def test_first_edits_efficacy_read_from_the_checkpoint_records_is_the_scored_one():
    """The checkpoint reads the first edits' efficacy from CounterFact's records of all applied edits;
    scoring the first edits' rewrite prompts alone (other batches, another code path) agrees."""
    from rlsedit.bench.methods_eval import retention_of_first
    from rlsedit.eval.counterfact import score_requests, summarize
    from rlsedit.requests import parse_request

    lm = make_lm("llama", n_layers=8)
    applied = [parse_request(e) for e in FIVE]
    config = MethodBenchConfig(n=5, retention_first=3, eval_batch_size=2)
    records = score_requests(lm, applied, batch_size=2)
    read = summarize(records[:3])["efficacy"]  # what the checkpoint reads
    scored = retention_of_first(lm, applied, config, None)
    assert scored["edits"] == 3 and scored["generation"] is None
    assert read == pytest.approx(scored["efficacy"])
    assert read == pytest.approx(sum(r["rewrite_success"] for r in records[:3]) / 3)
    assert retention_of_first(lm, applied, config, None, efficacy=0.25)["efficacy"] == 0.25  # given: kept
    assert summarize([{"id": "x", "rewrite_success": None}])["efficacy"] is None  # none scored: no rate


def test_records_out_of_order_are_refused_rather_than_read_as_the_first_edits(monkeypatch):
    from rlsedit.bench.methods_eval import evaluate_checkpoint
    from rlsedit.eval import runner
    from rlsedit.requests import parse_request

    applied = [parse_request(e) for e in FIVE]
    swapped = [{"id": r.id, "rewrite_success": 1.0} for r in reversed(applied)]
    monkeypatch.setattr(runner, "run_eval", lambda *a, **k: {"counterfact": {"records": swapped, "summary": {}}})
    config = MethodBenchConfig(n=5, retention_first=3)
    with pytest.raises(InvalidRequestError, match="in order"):
        evaluate_checkpoint(None, applied, config, general=())


# ---- the whole benchmark ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def collapsed(setup):
    """rlsedit and ft on the same stream; ft's last-batch efficacy is forced below chance at every
    checkpoint, rlsedit's above: ft stops at its second checkpoint, rlsedit goes on."""
    from rlsedit.bench import methods

    out = setup["root"] / "collapse"
    current = {}
    real_run_one = methods._run_one

    def run_one(run, *args, **kwargs):
        current["name"] = run.name
        return real_run_one(run, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods, "_run_one", run_one)
        mp.setattr(methods, "last_batch_efficacy", lambda lm, batch, config: 0.2 if current["name"] == "ft" else 0.9)
        full = run_method_bench(_long_config(setup), out)
    return out, full


def test_checkpoints_fall_on_the_batches_that_reach_the_asked_counts(collapsed):
    _, full = collapsed
    batches = full["methods"]["rlsedit"]["batches"]
    assert [b["edits"] for b in batches] == [2, 4, 5]
    assert [b.get("checkpoint_for") for b in batches] == [[1], [3], [5]]
    assert all(b["evaluation"]["counterfact"]["summary"]["requests"] == b["edits"] for b in batches)
    assert full["settings"]["checkpoint_edits"] == [1, 3, 5]


def test_retention_of_the_first_edits_is_in_every_checkpoint(collapsed):
    out, full = collapsed
    for name in ("rlsedit", "ft"):
        for b in full["methods"][name]["batches"]:
            first = b["evaluation"]["retention_first"]
            applied = min(4, b["edits"])  # the first 4 edits of the stream, those applied so far
            assert first["edits"] == applied and 0.0 <= first["efficacy"] <= 1.0, (name, b["batch"], first)
            assert first["generation"]["edits"] == applied and 0.0 <= first["generation"]["edit_begins"] <= 1.0
    # at 4 edits the first 4 are all the edits applied: the same figures as the checkpoint's own
    # CounterFact (whose records the efficacy is read from) and generation scores (another code path)
    middle = full["methods"]["rlsedit"]["batches"][1]["evaluation"]
    assert middle["retention_first"]["efficacy"] == pytest.approx(middle["counterfact"]["summary"]["efficacy"])
    assert middle["retention_first"]["efficacy"] > 0  # the tiny model takes one of them: not a vacuous equality
    assert middle["retention_first"]["generation"]["edit_begins"] == middle["generation"]["summary"]["edit_begins"]
    assert full["unedited"]["evaluation"]["retention_first"]["edits"] == 4
    md = (out / "results.md").read_text()
    assert "Eff. first 4↑" in md and "| Eff. first 4 | says it first 4 | Eff. last batch |" in md
    assert "| rlsedit | 4 (asked 3) |" in md
    assert (out / "metrics_vs_edits.png").stat().st_size > 1000


def test_the_collapsed_method_stops_and_the_others_go_on(collapsed):
    out, full = collapsed
    ft, rls = full["methods"]["ft"], full["methods"]["rlsedit"]
    assert [b["batch"] for b in ft["batches"]] == [1, 2] and [b["batch"] for b in rls["batches"]] == [1, 2, 3]
    assert ft["stopped"] == {"at_edits": 4, "at_batch": 2, "reason": STOPPED_ROW.split("(")[1][:-1],
                             "last_batch_efficacy": [0.2, 0.2]}
    assert rls["stopped"] is None
    assert ft["status"]["edits_applied"] == 4 and rls["status"]["edits_applied"] == 5
    assert sum(b["count"] for b in ft["final"]["retention"]["bins"]["success"]) == 4  # only the applied edits
    assert [b["evaluation"]["last_batch_efficacy"] for b in ft["batches"]] == [0.2, 0.2]
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ft |"))
    assert row.startswith(f"| ft | {STOPPED_ROW} |")
    assert next(line for line in md.splitlines() if line.startswith("| rlsedit |")).startswith("| rlsedit | 5 |")


def test_a_resumed_run_does_not_restart_a_stopped_method(collapsed, setup):
    out, full = collapsed
    stamp = (out / "ft" / "result.json").stat().st_mtime_ns
    again = run_method_bench(_long_config(setup), out)  # the real last-batch efficacy: never reached
    assert (out / "ft" / "result.json").stat().st_mtime_ns == stamp
    assert again["methods"]["ft"]["stopped"]["at_edits"] == 4
    # killed after its stop was recorded but before result.json: the progress lines keep it stopped
    (out / "ft" / "result.json").unlink()
    resumed = run_method_bench(_long_config(setup), out)["methods"]["ft"]
    assert [b["batch"] for b in resumed["batches"]] == [1, 2] and resumed["status"]["edits_applied"] == 4
    assert resumed["stopped"]["at_edits"] == 4
    with pytest.raises(StateMismatchError, match="other settings \\(checkpoint_edits\\)"):
        run_method_bench(_long_config(setup, checkpoint_edits=(2, 5)), out)


def test_a_report_of_some_runs_keeps_every_other_run_of_the_folder(collapsed, tmp_path):
    """A process that ran one method (or one sweep point) rewrites the folder's report: the rows of
    the folder's other runs stay, under their run names (read from run.json)."""
    import shutil

    out = tmp_path / "bench"
    shutil.copytree(collapsed[0], out, ignore=shutil.ignore_patterns("state"))
    assert json.loads((out / "ft" / "run.json").read_text()) == {"name": "ft"}
    full = write_report(out, ["ft"])
    assert full["runs"] == ["ft", "rlsedit"] and full["methods"]["rlsedit"]["status"]["edits_applied"] == 5
    assert "| rlsedit | 5 |" in (out / "results.md").read_text()
    # a sweep point's folder, and one written before run names were recorded (its folder name)
    shutil.copytree(out / "rlsedit", out / "rlsedit_mu_reg-2")
    (out / "rlsedit_mu_reg-2" / "run.json").write_text(json.dumps({"name": "rlsedit[mu_reg=2]"}))
    shutil.copytree(out / "rlsedit", out / "older")
    (out / "older" / "run.json").unlink()
    # a renamed folder keeps its old run.json: reported under its folder name, not as that run
    shutil.copytree(out / "ft", out / "renamed")
    full = write_report(out, ["rlsedit"])
    assert full["runs"] == ["rlsedit", "ft", "older", "renamed", "rlsedit[mu_reg=2]"]
    assert full["methods"]["renamed"]["stopped"]["at_edits"] == 4
    assert set(full["methods"]) == set(full["runs"])
    assert write_report(out)["runs"] == ["ft", "older", "renamed", "rlsedit", "rlsedit[mu_reg=2]"]


def test_a_partial_run_reports_the_edits_done_and_the_date(setup, monkeypatch):
    out = setup["root"] / "partial"
    config = _long_config(setup, methods=("rlsedit",), stop_below_chance=False, retention_first=0, gen_n=0)
    run_killed_at_edit(config, out, 3, monkeypatch)  # killed in the third batch: 4 of 5 edits done
    today = datetime.now(timezone.utc).date().isoformat()
    full = write_report(out, ["rlsedit", "ft"])
    partial = full["methods"]["rlsedit"]["partial"]
    assert partial["edits_done"] == 4 and partial["of"] == 5
    assert partial["date"] == datetime.fromisoformat(
        full["methods"]["rlsedit"]["batches"][-1]["finished_at"]).date().isoformat()
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| rlsedit |"))
    assert row.startswith(f"| rlsedit | partial: 4 of 5 edits, {partial['date']} |")
    assert "| ft | not run |" in md
    # each progress line names the code and machine that ran it; the partial report reads them
    last = full["methods"]["rlsedit"]["batches"][-1]
    assert last["code"]["rlsedit"] and last["machine"]["torch_threads"] >= 1
    assert full["machine"] == last["machine"] and full["machine"].get("note") is None
    # and the Adam steps its value targets took (the journal's target_steps, summarised)
    assert last["target_steps_mean"] >= 0 and 0 <= last["target_steps_capped"] <= 2  # a batch of 2
    # the report found on its own (no names) holds the same partial run; a line written before
    # progress lines had dates takes the file's date
    lines = (out / "rlsedit" / "progress.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for rec in records:
        rec.pop("finished_at")
    (out / "rlsedit" / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    again = write_report(out)
    assert again["runs"] == ["rlsedit"] and again["methods"]["rlsedit"]["partial"]["edits_done"] == 4
    assert again["methods"]["rlsedit"]["partial"]["date"] == today
    # a checkpoint behind the edits done is named: after batch 2 (4 edits) the last scores are at 2
    records[-1].pop("evaluation")
    (out / "rlsedit" / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    full = write_report(out)
    assert format_partial_row(full).startswith(f"| rlsedit | partial: 4 of 5 edits, {today}; scores at 2 |")
    # every batch done but no result.json (killed during the end-of-stream scores)
    full["methods"]["rlsedit"]["partial"]["edits_done"] = 5
    assert "5 of 5 edits" in format_partial_row(full) and "end-of-stream scores pending" in format_partial_row(full)


def format_partial_row(full) -> str:
    from rlsedit.bench.methods_report import format_results_markdown

    return next(line for line in format_results_markdown(full).splitlines() if line.startswith("| rlsedit |"))


def test_target_steps_summary():
    from rlsedit.bench.methods import target_steps_summary

    assert target_steps_summary([3, 24, 10, 24], 25) == {"target_steps_mean": 15.25, "target_steps_capped": 2}
    assert target_steps_summary([3, 5], None) == {"target_steps_mean": 4.0}
    assert target_steps_summary([], 25) == {} and target_steps_summary(None, 25) == {}
