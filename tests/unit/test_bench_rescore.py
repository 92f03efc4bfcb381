"""The generation sample of each checkpoint (min(gen_n, edits so far) of the edits applied) and the
re-scoring of checkpoints a run scored on fewer, on weights rebuilt from its target log."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from rlsedit.bench.methods import TARGETS_DIR, run_method_bench
from rlsedit.bench.methods_eval import RunScoring, generation_plan
from rlsedit.bench.methods_report import write_report
from rlsedit.bench.rescore import rescore_generation, stale_checkpoints
from rlsedit.bench.resume import read_progress, rewrite_progress
from rlsedit.errors import InvalidRequestError, StateMismatchError
from rlsedit.eval.generation import sample_positions
from rlsedit.requests import EditRequest
from test_bench_methods import _config, tiny_setup  # noqa: F401 (a fixture)


def _requests(n: int) -> list[EditRequest]:
    return [EditRequest(id=f"e{i}", prompt="{} is in", subject=f"S{i}", target_new="Rome", target_true="Paris")
            for i in range(n)]


def test_each_checkpoint_samples_min_gen_n_of_the_applied_edits(tiny_setup):
    plan = generation_plan(_config(tiny_setup, n=40, gen_n=10), _requests(40))
    # the end of the stream scores the stream's own sample (what the unedited row scores)
    assert plan.at(40) == list(plan.positions) == sample_positions(40, 10, 0)
    assert plan.at(6) == list(range(6))  # fewer applied than gen_n: all of them
    for applied in (10, 15, 20, 33):
        chosen = plan.at(applied)
        assert len(chosen) == 10 == len(set(chosen)) and max(chosen) < applied
        # the stream's sample among the applied edits is always kept
        assert {p for p in plan.positions if p < applied} <= set(chosen)
    assert plan.at(20) == generation_plan(_config(tiny_setup, n=40, gen_n=10), _requests(40)).at(20)  # seeded
    assert set(plan.union([6, 20, 40])) == set(plan.at(6)) | set(plan.at(20)) | set(plan.at(40))
    # gen_n above the stream: every applied edit at every checkpoint
    everything = generation_plan(_config(tiny_setup, n=40, gen_n=100), _requests(40))
    assert everything.at(7) == list(range(7)) and everything.at(40) == list(range(40))


@pytest.fixture(scope="module")
def scored(tiny_setup):
    """A finished rlsedit run whose first checkpoint is made to look scored under the earlier rule
    (one sample of gen_n=3 over the stream: a single edit of the first two)."""
    out = tiny_setup["root"] / "rescore"
    config = _config(tiny_setup, methods=("rlsedit",), general=(), gen_n=3, retention_first=2)
    run_method_bench(config, out)
    progress = out / "rlsedit" / "progress.jsonl"
    records = read_progress(progress)
    assert [r["evaluation"]["generation"]["counts"]["edits"] for r in records] == [2, 3]
    fresh = json.loads(json.dumps(records[0]["evaluation"]))
    old = records[0]["evaluation"]
    old["generation"]["counts"]["edits"] = 1
    old["generation"]["summary"]["edit_begins"] = 0.123
    old["retention_first"]["generation"] = {"edits": 1, "edit_begins": 0.123}
    rewrite_progress(progress, records)
    return out, config, fresh


def test_a_checkpoint_scored_on_fewer_edits_is_rescored_on_the_rebuilt_weights(scored):
    out, config, fresh = scored
    progress = out / "rlsedit" / "progress.jsonl"
    before = read_progress(progress)
    plan = generation_plan(config, [None] * config.n)
    assert stale_checkpoints(before, RunScoring(config, (), plan)) == [1]
    summary = rescore_generation(config, out)
    assert summary == {"rlsedit": [{"batch": 1, "edits": 2,
                                    "before": {"generation_edits": 1, "first_generation_edits": 1},
                                    "after": {"generation_edits": 2, "first_generation_edits": 2},
                                    "weights": {"identical": True}}]}
    after = read_progress(progress)
    ev = after[0]["evaluation"]
    # the same weights give the same figures the original scoring of the full sample gave
    assert ev["generation"]["summary"] == fresh["generation"]["summary"]
    assert ev["retention_first"]["generation"] == fresh["retention_first"]["generation"]
    assert ev["retention_first"]["efficacy"] == before[0]["evaluation"]["retention_first"]["efficacy"]
    assert ev["generation_rescored"]["before"] == {"generation_edits": 1, "first_generation_edits": 1}
    # teacher-forced scores, timings and the other checkpoint are untouched
    assert ev["counterfact"] == before[0]["evaluation"]["counterfact"]
    assert after[0]["total_s"] == before[0]["total_s"] and after[1] == before[1]
    # the finished run's result holds the same lines, and the report says how many were sampled
    assert json.loads((out / "rlsedit" / "result.json").read_text())["batches"] == after
    write_report(out, ["rlsedit"])
    md = (out / "results.md").read_text()
    assert "sampled edits (of first 2)" in md and "| 2 (2), re-scored |" in md
    # a checkpoint re-scored before --rebuild-tolerance records no weights match: it was bit for bit
    result_path = out / "rlsedit" / "result.json"
    result = json.loads(result_path.read_text())
    del result["batches"][0]["evaluation"]["generation_rescored"]["weights"]
    result_path.write_text(json.dumps(result))
    write_report(out, ["rlsedit"])
    assert "| 2 (2), re-scored |" in (out / "results.md").read_text()
    assert rescore_generation(config, out) == {"rlsedit": []}  # nothing left to do


def test_weights_that_do_not_rebuild_bit_for_bit_are_rescored_only_within_the_tolerance(scored):
    """A digest that differs (as on another CPU) is refused, unless every layer's drift and anchor
    residual match the progress line's within the tolerance; that difference is then recorded."""
    out, config, fresh = scored
    progress = out / "rlsedit" / "progress.jsonl"
    records = read_progress(progress)
    records[0]["evaluation"]["generation"]["counts"]["edits"] = 1
    records[0]["edited_weights_sha256"] = "0" * 64
    rewrite_progress(progress, records)
    with pytest.raises(StateMismatchError, match="not the checkpoint's.*difference .* is 0.00e.*--rebuild-tolerance"):
        rescore_generation(config, out)
    assert read_progress(progress) == records  # nothing rewritten
    layers = records[0]["diagnostics"]["layers"]
    layer = sorted(layers)[-1]
    assert set(layers[layer]) >= {"drift_fro", "anchor_residual"}
    true_residual = layers[layer]["anchor_residual"]
    layers[layer]["anchor_residual"] = true_residual * (1 + 1e-4)  # one layer off by more than rounding
    rewrite_progress(progress, records)
    with pytest.raises(StateMismatchError, match=r"is 1\.00e-04"):
        rescore_generation(config, out, tolerance=1e-6)
    assert read_progress(progress) == records
    with pytest.raises(InvalidRequestError, match="tolerance"):
        rescore_generation(config, out, tolerance=0.5)

    layers[layer]["anchor_residual"] = true_residual * (1 + 1e-7)
    rewrite_progress(progress, records)
    [done] = rescore_generation(config, out, tolerance=1e-6)["rlsedit"]
    assert done["weights"]["identical"] is False and done["weights"]["tolerance"] == 1e-6
    assert done["weights"]["layer_rel_diff"] == pytest.approx(1e-7, rel=1e-3)
    ev = read_progress(progress)[0]["evaluation"]
    assert ev["generation_rescored"]["weights"] == done["weights"]
    assert ev["generation_rescored"]["machine"]["cpu"]
    assert ev["generation"]["summary"] == fresh["generation"]["summary"]  # the same weights in fact
    write_report(out, ["rlsedit"])
    assert "| 2 (2), re-scored ≈1.0e-07 |" in (out / "results.md").read_text()


def test_a_checkpoint_whose_batch_left_no_logged_targets_is_refused(scored, tmp_path):
    """Weights that could only be rebuilt by optimising again are not re-scored: the error names the
    batch, and nothing is rewritten."""
    out, config, _ = scored
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("state"))
    progress = copy / "rlsedit" / "progress.jsonl"
    records = read_progress(progress)
    records[0]["evaluation"]["generation"]["counts"]["edits"] = 1  # stale again
    rewrite_progress(progress, records)
    logged = sorted((copy / "rlsedit" / TARGETS_DIR).glob("*.safetensors"))
    assert len(logged) == 2  # one file per batch
    for path in logged:
        path.unlink()
    with pytest.raises(StateMismatchError, match="batch 1 is not in the target log"):
        rescore_generation(config, copy)
    assert read_progress(progress) == records


def test_rescoring_refuses_a_folder_without_a_benchmark_and_other_settings(scored, tmp_path):
    out, config, _ = scored
    with pytest.raises(InvalidRequestError, match="holds no method benchmark"):
        rescore_generation(config, tmp_path)
    with pytest.raises(StateMismatchError, match="other settings"):
        rescore_generation(dataclasses.replace(config, gen_n=5), out)


def test_a_method_without_value_targets_is_rescored_on_weights_computed_again(tiny_setup):
    """FT logs no value targets: its stale checkpoint is rescored on weights computed again from
    the same requests, which on this machine are the checkpoint's bit for bit."""
    out = tiny_setup["root"] / "rescore-ft"
    config = _config(tiny_setup, methods=("ft",), general=(), gen_n=3)
    run_method_bench(config, out)
    progress = out / "ft" / "progress.jsonl"
    records = read_progress(progress)
    fresh = json.loads(json.dumps(records[0]["evaluation"]["generation"]))
    records[0]["evaluation"]["generation"]["counts"]["edits"] = 1
    records[0]["evaluation"]["generation"]["summary"]["edit_begins"] = 0.123
    rewrite_progress(progress, records)
    assert not (out / "ft" / "targets").exists()
    [done] = rescore_generation(config, out)["ft"]
    assert done["batch"] == 1 and done["weights"] == {"identical": True}
    assert done["before"]["generation_edits"] == 1 and done["after"]["generation_edits"] == 2
    after = read_progress(progress)
    rescored = after[0]["evaluation"]["generation"]
    assert {k: v for k, v in rescored.items() if k != "seconds"} == {k: v for k, v in fresh.items() if k != "seconds"}
    assert after[1] == records[1]


def test_the_rebuild_tolerance_is_refused_without_a_rescore(capsys):
    from rlsedit import cli

    assert cli.main(["bench", "methods", "--out", "unused", "--rebuild-tolerance", "1e-6"]) == 2
    assert "--rebuild-tolerance applies only with --rescore-generation" in capsys.readouterr().err
