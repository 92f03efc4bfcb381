"""The method benchmark on a tiny random model saved to disk: same stream for every method,
fresh weights per method, checkpoints, diagnostics, reports, and resumption after a kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from locate_tiny import SENTENCES, make_lm
from rlsedit.bench.edit_stream import checkpoint_batches, select_edits
from rlsedit.bench.methods import run_method_bench
from rlsedit.bench.methods_config import MethodBenchConfig, plan_runs
from rlsedit.bench.methods_report import format_results_markdown, write_report
from rlsedit.bench.plots import MAX_TRACED_SWEEP_POINTS, sweep_points, traced_runs
from rlsedit.bench.resume import read_progress
from rlsedit.bench.sweep import parse_sweep, run_dir_name, sweep_run_name
from rlsedit.eval.runner import general_suite_names
from rlsedit.errors import InvalidRequestError, StateMismatchError
from tiny_models import save

EDITS = [
    {"id": "e0", "prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "paraphrases": ["Where is The Eiffel Tower? It is in"],
     "neighborhood": ["The capital of France is"], "neighborhood_answers": ["Paris"]},
    {"id": "e1", "prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano", "target_true": "guitar",
     "paraphrases": ["The instrument of Toko Yasuda is the"], "neighborhood": ["Michael Jordan plays the"],
     "neighborhood_answers": ["basketball"]},
    {"id": "e2", "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "Swedish",
     "target_true": "French", "paraphrases": ["{} speaks".replace("{}", "Danielle Darrieux")],
     "neighborhood": ["Sweden speaks"], "neighborhood_answers": ["Swedish"]},
    {"id": "e3", "prompt": "{}, which is located in", "subject": "Autonomous University of Madrid",
     "target_new": "Sweden", "target_true": "Spain", "paraphrases": ["Autonomous University of Madrid is in"],
     "neighborhood": ["Madrid is located in"], "neighborhood_answers": ["Spain"]},
]
FAST = {"v_num_grad_steps": 4, "context_count": 1, "context_length": 3, "mom2_update_weight": 10.0}


def save_tiny_model(folder: Path) -> Path:
    """A tiny random llama (see locate_tiny) saved as a Hugging Face directory load_model reads.

    Eight layers: the default band of an unknown model (1-5) then ends below the last block.
    Edited at the last block, δ reaches only the subject's own logits, and these prompts read
    their targets after the subject: the objective has no gradient there."""
    lm = make_lm("llama", n_layers=8)
    return save(folder, lm.model, lm.tokenizer)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    model = save_tiny_model(root / "tiny-model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 4))
    data = root / "edits.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EDITS))
    hparams = root / "hparams"
    hparams.mkdir()
    for method in ("rlsedit", "memit-seq", "rome", "ft"):
        (hparams / f"{method}.json").write_text(json.dumps(FAST))
    data_dir = root / "data"
    (data_dir / "corpus").mkdir(parents=True)
    (data_dir / "corpus" / "wikitext2_test.txt").write_text(" ".join(SENTENCES * 3))
    return {"root": root, "model": model, "corpus": corpus, "data": data, "hparams": hparams, "data_dir": data_dir}


def _config(setup, **changes) -> MethodBenchConfig:
    base = dict(model=str(setup["model"]), data=str(setup["data"]), methods=("rlsedit", "memit-seq", "ft"), n=4,
                batch_size=2, checkpoints=2, general=("ppl",), ppl_tokens=60, mom2_tokens=200,
                corpus=str(setup["corpus"]), hparams_dir=str(setup["hparams"]), data_dir=str(setup["data_dir"]),
                cache_dir=str(setup["root"] / "cache"), retention_bins=2, eval_batch_size=4)
    base.update(changes)
    return MethodBenchConfig(**base)


# ---- pieces -----------------------------------------------------------------------------------

def test_checkpoint_batches_are_evenly_spaced_and_end_at_the_last():
    assert checkpoint_batches(10, 4) == [2, 5, 8, 10]
    assert checkpoint_batches(3, 10) == [1, 2, 3]
    assert checkpoint_batches(7, 1) == [7]
    with pytest.raises(InvalidRequestError):
        checkpoint_batches(0, 2)


def test_parse_sweep_builds_the_grid_in_order():
    grid = parse_sweep("lambda=0,0.1;mu=0.5,1,2")
    assert len(grid) == 6
    assert grid[0] == {"lambda_reg": 0.0, "mu_reg": 0.5} and grid[-1] == {"lambda_reg": 0.1, "mu_reg": 2.0}
    assert parse_sweep(None) == [] and parse_sweep("  ") == []
    assert sweep_run_name(grid[1]) == "rlsedit[lambda_reg=0,mu_reg=1]"
    assert run_dir_name(sweep_run_name(grid[1])) == "rlsedit_lambda_reg-0_mu_reg-1"
    for bad in ("lambda", "nope=1", "mu=a", "mu=inf", "mu=1;mu=2", "mu=", "layers=5-3", "layers=a", "layers=3+3",
                "layers=2.5", "layers=-1-2"):
        with pytest.raises(InvalidRequestError):
            parse_sweep(bad)


def test_parse_sweep_takes_layer_bands_and_lists_and_n():
    grid = parse_sweep("layers=3-5,2+4;n=10,20")
    assert grid[0] == {"layers": (3, 4, 5), "mom2_update_weight": 10.0}
    assert grid[3] == {"layers": (2, 4), "mom2_update_weight": 20.0}
    assert [sweep_run_name(p) for p in grid[::2]] == ["rlsedit[layers=3-5,mom2_update_weight=10]",
                                                      "rlsedit[layers=2+4,mom2_update_weight=10]"]
    assert sweep_run_name({"layers": (6,)}) == "rlsedit[layers=6]"


def test_general_suite_names_expand_aliases_and_refuse_unknown():
    assert general_suite_names(["ppl", "knowns", "ppl"]) == ("wikitext", "knowns")
    assert "sst2" in general_suite_names(["glue"]) and "mrpc" in general_suite_names(["glue"])
    with pytest.raises(InvalidRequestError, match="unknown general suite"):
        general_suite_names(["hellaswag"])


def test_config_refuses_bad_values():
    with pytest.raises(InvalidRequestError, match="batch_size"):
        MethodBenchConfig(data="x", batch_size=0)
    with pytest.raises(InvalidRequestError, match="twice"):
        MethodBenchConfig(data="x", methods=("rome", "rome"))
    with pytest.raises(InvalidRequestError, match="data_dir"):
        MethodBenchConfig(data="x", general=("ppl",))


def test_rows_per_target_pass_are_a_machine_fact_not_a_pinned_setting(tiny_setup):
    """--target-rows changes how targets run, not a figure: settings.json leaves it out and each
    progress line's machine records it."""
    from rlsedit.bench.methods import bench_machine
    from rlsedit.bench.resume import bench_settings

    requests = select_edits(tiny_setup["data"], 4)
    wide, default = _config(tiny_setup, target_rows=700), _config(tiny_setup)
    assert bench_settings(wide, requests, ("ppl",)) == bench_settings(default, requests, ("ppl",))
    assert bench_machine(wide)["target_rows"] == 700 and bench_machine(default)["target_rows"] == 32
    with pytest.raises(InvalidRequestError, match="target_rows"):
        _config(tiny_setup, target_rows=0)


def test_select_edits_file_order_or_seeded_shuffle(tiny_setup):
    first = select_edits(tiny_setup["data"], 3)
    assert [r.id for r in first] == ["e0", "e1", "e2"]
    shuffled = select_edits(tiny_setup["data"], 4, shuffle=True, seed=3)
    assert sorted(r.id for r in shuffled) == ["e0", "e1", "e2", "e3"]
    assert [r.id for r in shuffled] == [r.id for r in select_edits(tiny_setup["data"], 4, shuffle=True, seed=3)]
    with pytest.raises(InvalidRequestError, match="fewer than"):
        select_edits(tiny_setup["data"], 10)


def test_plan_runs_reads_hparams_and_adds_sweep_points(tiny_setup):
    runs = plan_runs(_config(tiny_setup, methods=("rlsedit", "memit"), sweep="mu=0.5,2"))
    assert [r.name for r in runs] == ["rlsedit", "memit", "rlsedit[mu_reg=0.5]", "rlsedit[mu_reg=2]"]
    assert runs[0].config.v_num_grad_steps == 4 and runs[0].config.mom2_n_samples == 200
    assert runs[1].config.v_num_grad_steps == 25  # no memit.json: defaults
    assert runs[3].config.mu_reg == 2.0 and runs[3].config.v_num_grad_steps == 4
    with pytest.raises(InvalidRequestError, match="unknown method"):
        plan_runs(_config(tiny_setup, methods=("nope",)))
    layer_runs = plan_runs(_config(tiny_setup, methods=("rlsedit",), sweep="layers=1-2,3"))
    assert [r.config.layers for r in layer_runs] == [None, (1, 2), (3,)]
    alone = plan_runs(_config(tiny_setup, methods=("rlsedit", "memit"), sweep="mu=2", sweep_only=True))
    assert [r.name for r in alone] == ["rlsedit[mu_reg=2]"] and alone[0].config.v_num_grad_steps == 4
    with pytest.raises(InvalidRequestError, match="no sweep"):
        _config(tiny_setup, sweep_only=True)


def test_a_small_sweep_is_drawn_along_the_stream_and_a_grid_is_not():
    small = {"rlsedit": 1, "rlsedit[lambda_reg=4]": 2, "memit": 3}
    assert list(traced_runs(small)) == ["rlsedit", "rlsedit[lambda_reg=4]", "memit"]
    grid = {"rlsedit": 1, **{f"rlsedit[mu_reg={i}]": i for i in range(MAX_TRACED_SWEEP_POINTS + 1)}}
    assert list(traced_runs(grid)) == ["rlsedit"]


def test_a_layer_sweep_runs_and_is_plotted(tiny_setup):
    out = tiny_setup["root"] / "layer-sweep"
    full = run_method_bench(_config(tiny_setup, methods=("rlsedit",), sweep="layers=1-2,2-3", general=(),
                                    checkpoints=1), out)
    assert full["runs"] == ["rlsedit", "rlsedit[layers=1-2]", "rlsedit[layers=2-3]"]
    for name, layers in (("rlsedit[layers=1-2]", [1, 2]), ("rlsedit[layers=2-3]", [2, 3])):
        result = full["methods"][name]
        assert result["config"]["layers"] == layers
        assert sorted(result["batches"][-1]["diagnostics"]["layers"]) == [str(l) for l in layers]
    assert (out / "sweep.png").stat().st_size > 1000
    assert list(sweep_points(full["methods"])) == full["runs"]  # drawn beside the defaults it departs from
    assert "rlsedit[layers=2-3]" in (out / "results.md").read_text()


def test_sweep_points_are_the_finished_ones_led_by_the_finished_defaults():
    finished, partial = {"config": {"lambda_reg": 0.0}}, {"config": {"lambda_reg": 0.0}, "partial": "500 of 1,000 edits"}
    point, partial_point = {"config": {"lambda_reg": 4.0}}, {"config": {"lambda_reg": 8.0}, "partial": "500 of 1,000 edits"}
    assert list(sweep_points({"rlsedit": finished, "memit": finished, "rlsedit[lambda_reg=4]": point})) == [
        "rlsedit", "rlsedit[lambda_reg=4]"]
    assert list(sweep_points({"rlsedit": partial, "rlsedit[lambda_reg=4]": point,
                              "rlsedit[lambda_reg=8]": partial_point})) == ["rlsedit[lambda_reg=4]"]
    assert sweep_points({"rlsedit": finished}) == {}
    defaults, other = {"config": {"lambda_reg": 0.0}}, {"config": {"lambda_reg": 4.0}}
    assert list(sweep_points({"rlsedit": defaults, "rlsedit[lambda_reg=0]": {"config": {"lambda_reg": 0.0}},
                              "rlsedit[lambda_reg=4]": other})) == ["rlsedit[lambda_reg=0]", "rlsedit[lambda_reg=4]"]


def test_sweep_figure_labels_the_defaults_unset_layers_as_default():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rlsedit.bench.plots import _sweep_figure

    def run(lambda_reg, layers, efficacy):
        return {"config": {"lambda_reg": lambda_reg, "layers": layers},
                "batches": [{"evaluation": {"counterfact": {"summary": {"efficacy": efficacy, "specificity": 0.6}}}}]}

    fig = _sweep_figure(plt, {"rlsedit": run(0.0, None, 0.9), "rlsedit[layers=2-8]": run(0.0, [2, 3, 4, 5, 6, 7, 8], 0.8),
                              "rlsedit[lambda_reg=4]": run(4.0, None, 0.95)})
    efficacy_panel = fig.axes[0]
    assert [t.get_text() for t in efficacy_panel.get_legend().get_texts()] == ["layers=default", "layers=2-8"]
    assert [line.get_ydata().tolist() for line in efficacy_panel.get_lines()] == [[0.9, 0.95], [0.8]]
    plt.close(fig)


def run_killed_at_edit(config: MethodBenchConfig, out: Path, call: int, monkeypatch) -> None:
    """Run the benchmark with its ``call``-th ``Session.edit`` (a batch) killed before it edits."""
    from rlsedit.session.session import Session

    real_edit = Session.edit
    calls = {"n": 0}

    def dying_edit(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated kill")
        return real_edit(self, *args, **kwargs)

    monkeypatch.setattr(Session, "edit", dying_edit)
    with pytest.raises(KeyboardInterrupt):
        run_method_bench(config, out)


# ---- the whole benchmark ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tiny_setup):
    out = tiny_setup["root"] / "run"
    full = run_method_bench(_config(tiny_setup), out)
    return out, full


def test_every_method_runs_the_same_stream_with_diagnostics_and_checkpoints(finished):
    out, full = finished
    assert full["runs"] == ["rlsedit", "memit-seq", "ft"]
    assert full["settings"]["edit_ids"] == ["e0", "e1", "e2", "e3"]
    for name in full["runs"]:
        result = full["methods"][name]
        assert [b["batch"] for b in result["batches"]] == [1, 2]
        assert [b["edits"] for b in result["batches"]] == [2, 4]
        assert result["status"]["edits_applied"] == 4
        for b in result["batches"]:
            assert b["total_s"] > 0 and b["diagnostics"]["drift_fro"] > 0, (name, b["batch"], b["diagnostics"])
            # both checkpoints evaluated, on the edits applied so far
            assert b["evaluation"]["counterfact"]["summary"]["requests"] == b["edits"]
            assert b["evaluation"]["general"]["wikitext"]["ppl"] > 1
        assert result["seconds_per_edit"] > 0
        bins = result["final"]["retention"]["bins"]["success"]
        assert [b["count"] for b in bins] == [2, 2]
    # the closed-form methods report solve time and an anchor residual; FT has neither
    for name in ("rlsedit", "memit-seq"):
        assert all(b["solve_s"] > 0 for b in full["methods"][name]["batches"])
        assert full["methods"][name]["batches"][-1]["diagnostics"]["anchor_residual"] > 0
    assert all(b["solve_s"] is None for b in full["methods"]["ft"]["batches"])
    assert full["methods"]["ft"]["batches"][-1]["diagnostics"]["anchor_residual"] is None
    # RLSEdit at λ=0 is sequential MEMIT: on the first batch (same unedited model, so the same
    # keys and targets) both write the same weights up to float32 rounding; later batches'
    # targets are re-optimised on slightly different models, so they are not compared
    w_rls = full["methods"]["rlsedit"]["batches"][0]["diagnostics"]["drift_fro"]
    w_seq = full["methods"]["memit-seq"]["batches"][0]["diagnostics"]["drift_fro"]
    assert w_rls == pytest.approx(w_seq, rel=1e-3)
    # the unedited row is the base model: each method's edits changed its weights away from it
    base = full["unedited"]["weights_sha256"]
    assert all(full["methods"][n]["status"]["weights_sha256"] != base for n in full["runs"])


def test_reports_and_plots_are_written(finished):
    out, full = finished
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"].keys() == full["methods"].keys()
    md = (out / "results.md").read_text()
    for name in ("rlsedit", "memit-seq", "ft", "unedited", "chance", "Eff.", "Spe.", "PPL", "solve s/batch"):
        assert name in md
    assert md == format_results_markdown(on_disk)
    for png in ("metrics_vs_edits.png", "forgetting_curve.png", "drift_anchor.png", "solve_cost.png",
                "general_vs_edits.png"):
        assert (out / png).stat().st_size > 1000


def test_generation_metrics_sit_beside_the_teacher_forced_ones(finished):
    out, full = finished
    unedited = full["unedited"]
    # the unedited model's continuations (edit, paraphrase and neighbourhood prompts) are kept for
    # every method to compare against
    prompts = {p for e in EDITS for p in (e["prompt"].replace("{}", e["subject"]), *e["paraphrases"],
                                          *e["neighborhood"])}
    assert set(unedited["generation_pre_edit"]) == prompts
    assert all(isinstance(t, str) for t in unedited["generation_pre_edit"].values())
    # the same model decoded in other batches gives the same tokens
    assert unedited["evaluation"]["generation"]["summary"]["neighbour_unchanged"] == 1.0
    for name in full["runs"]:
        for b in full["methods"][name]["batches"]:
            gen = b["evaluation"]["generation"]
            assert gen["counts"]["edits"] == b["edits"]  # gen_n=200 covers every applied edit
            summary = gen["summary"]
            for key in ("edit_begins", "edit_mentions", "old_begins", "paraphrase_begins", "neighbour_unchanged",
                        "neighbour_true_begins"):
                assert 0.0 <= summary[key] <= 1.0, (name, key, summary[key])
            assert summary["open_mentions"] is None  # our own layout's paraphrases are paraphrases
            assert summary["chat_mentions"] is None  # the tiny tokenizer has no chat template
            assert any("no chat template" in note for note in gen["notes"])
            assert 0 < len(gen["samples"]) <= 30
            assert {s["kind"] for s in gen["samples"]} == {"edit", "paraphrase", "neighbour"}
            assert [bb["count"] for bb in gen["bins"]["edit_begins"]] == ([1, 1] if b["edits"] == 2 else [2, 2])
    md = (out / "results.md").read_text()
    for label in ("says it (edit)", "says it (paraphrase)", "mentions (rephrase)", "still says old",
                  "neighbour gen unchanged", "chat says it", "## Generation samples", "| kind | prompt |"):
        assert label in md
    assert full["settings"]["gen_n"] == 200 and full["settings"]["gen_max_new_tokens"] == 12


def test_easyedit_locality_is_recorded_once_and_reported_per_method(finished):
    out, full = finished
    unedited = full["unedited"]
    # the unedited model's argmaxes, one list per neighbourhood prompt of every edit
    reference = unedited["locality_pre_edit"]
    assert {k: len(v) for k, v in reference.items()} == {e["id"]: len(e["neighborhood"]) for e in EDITS}
    assert all(isinstance(t, int) for lists in reference.values() for ids in lists for t in ids)
    # the unedited model agrees with itself: 100
    assert unedited["evaluation"]["counterfact"]["summary"]["locality"] == 1.0
    for name in full["runs"]:
        for b in full["methods"][name]["batches"]:
            summary = b["evaluation"]["counterfact"]["summary"]
            assert 0.0 <= summary["locality"] <= 1.0 and summary["locality_n"] == b["edits"]
    md = (out / "results.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| Method | Edits | Eff.↑"))
    column = [c.strip() for c in head.split("|")].index("Loc. (EasyEdit)↑")
    row = next(line for line in md.splitlines() if line.startswith("| unedited (before editing) |"))
    assert [c.strip() for c in row.split("|")][column] == "100.0"
    for name in full["runs"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cell = [c.strip() for c in row.split("|")][column]
        expected = 100 * full["methods"][name]["batches"][-1]["evaluation"]["counterfact"]["summary"]["locality"]
        assert cell == f"{expected:.1f}"
    assert "| Loc. (EasyEdit) |" in md and any("locality (EasyEdit)" in note for note in full["notes"])


def test_a_row_scored_without_the_locality_reference_gets_it_added(finished, tiny_setup):
    out, full = finished
    path = out / "unedited.json"
    row = json.loads(path.read_text())
    reference = row.pop("locality_pre_edit")
    path.write_text(json.dumps(row))
    again = run_method_bench(_config(tiny_setup), out)  # every method is done: only the reference is computed
    assert again["unedited"]["locality_pre_edit"] == reference
    assert json.loads(path.read_text())["locality_pre_edit"] == reference


def test_a_zsre_file_is_refused(tiny_setup):
    zsre = tiny_setup["root"] / "zsre.json"
    zsre.write_text(json.dumps([{"subject": "Wellington", "src": "Which city is the twin of Wellington?",
                                 "alt": "Sheffield", "answers": ["Sydney"], "rephrase": "Wellington is twinned with?",
                                 "loc": "nq question: capital of France", "loc_ans": "Paris"}]))
    with pytest.raises(InvalidRequestError, match="zsRE.*rlsedit eval --suites zsre"):
        run_method_bench(_config(tiny_setup, data=str(zsre), n=1), tiny_setup["root"] / "zsre-out")
    assert not (tiny_setup["root"] / "zsre-out").exists()


def test_generation_settings_are_checked():
    with pytest.raises(InvalidRequestError, match="gen_n"):
        MethodBenchConfig(gen_n=-1)
    with pytest.raises(InvalidRequestError, match="gen_chat"):
        MethodBenchConfig(gen_chat="maybe")
    with pytest.raises(InvalidRequestError, match="gen_max_new_tokens"):
        MethodBenchConfig(gen_max_new_tokens=0)


def test_rerun_skips_finished_methods_and_refuses_other_settings(finished, tiny_setup):
    out, full = finished
    stamp = (out / "rlsedit" / "result.json").stat().st_mtime_ns
    again = run_method_bench(_config(tiny_setup), out)
    assert (out / "rlsedit" / "result.json").stat().st_mtime_ns == stamp
    assert again["methods"] == full["methods"]
    with pytest.raises(StateMismatchError, match="other settings"):
        run_method_bench(_config(tiny_setup, n=3), out)


def test_a_killed_run_resumes_mid_method_to_the_same_weights(finished, tiny_setup, monkeypatch):
    """Kill during the second batch of rlsedit (after batch 1 is journaled); a rerun continues
    from the journal and ends with the uninterrupted run's weights."""
    from rlsedit.session.session import Session

    _, full = finished
    out = tiny_setup["root"] / "killed"
    config = _config(tiny_setup, methods=("rlsedit",), general=(), checkpoints=1)
    real_edit = Session.edit
    run_killed_at_edit(config, out, 2, monkeypatch)
    monkeypatch.setattr(Session, "edit", real_edit)
    assert not (out / "rlsedit" / "result.json").exists()
    assert len((out / "rlsedit" / "progress.jsonl").read_text().splitlines()) == 1
    resumed = run_method_bench(config, out)
    result = resumed["methods"]["rlsedit"]
    assert [b["batch"] for b in result["batches"]] == [1, 2]
    assert result["status"]["weights_sha256"] == full["methods"]["rlsedit"]["status"]["weights_sha256"]
    # a batch journaled before the progress line was written keeps its edits, timings unknown
    (out / "rlsedit" / "result.json").unlink()
    lines = (out / "rlsedit" / "progress.jsonl").read_text().splitlines()
    (out / "rlsedit" / "progress.jsonl").write_text(lines[0] + "\n" + lines[1][:10])  # torn last line
    again = run_method_bench(config, out)["methods"]["rlsedit"]
    assert again["batches"][1]["resumed"] is True and again["batches"][1]["total_s"] is None
    assert again["status"]["weights_sha256"] == result["status"]["weights_sha256"]


def test_plain_bench_and_bench_methods_parse_to_the_same_config(tiny_setup, monkeypatch, capsys):
    from rlsedit import cli
    from rlsedit.bench import methods_cli

    seen = []

    def fake_run(config, out, progress=False):
        seen.append((config, out))
        return {"settings": {"model": config.model, "data": config.data, "n": config.n,
                             "batch_size": config.batch_size, "general": []},
                "runs": [], "methods": {}, "unedited": None}

    monkeypatch.setattr(methods_cli, "run_method_bench", fake_run)
    args = ["--model", "m", "--data", str(tiny_setup["data"]), "--out", "o", "--methods", "rlsedit,memit-seq",
            "--n", "8", "--batch-size", "4", "--general", "ppl,mmlu", "--data-dir", "d", "--sweep", "mu=1,2"]
    assert cli.main(["bench", "methods", *args]) == 0
    assert cli.main(["bench", *args]) == 0
    assert seen[0] == seen[1]
    config = seen[0][0]
    assert config.methods == ("rlsedit", "memit-seq") and config.n == 8 and config.general == ("ppl", "mmlu")
    assert config.checkpoints == MethodBenchConfig().checkpoints  # unspecified options keep their defaults
    # bench solver still reaches the solver benchmark, and a bare `bench` explains itself
    parser = cli.build_parser()
    from rlsedit.bench import solver_cli

    assert parser.parse_args(["bench", "solver", "--dk", "64"]).func is solver_cli._run
    assert cli.main(["bench"]) == 2
    assert "name a benchmark" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "m"]) == 2
    assert "missing --data, --out" in capsys.readouterr().err


def test_weights_that_differ_from_the_base_are_refused(finished, tiny_setup, tmp_path):
    # a method rerun on a benchmark whose unedited row names other weights
    out = tmp_path / "tampered"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "rlsedit")
    row = json.loads((out / "unedited.json").read_text())
    (out / "unedited.json").write_text(json.dumps(row | {"weights_sha256": "f" * 64}))
    with pytest.raises(StateMismatchError, match="differ from the base"):
        run_method_bench(_config(tiny_setup), out)


def test_the_unedited_row_is_written_in_stages_and_a_stop_keeps_what_it_scored(finished, tiny_setup, monkeypatch):
    from rlsedit.bench import counterfact_parts, unedited_row
    from rlsedit.eval import counterfact, generation

    out = tiny_setup["root"] / "staged"
    config = _config(tiny_setup, methods=("rlsedit",), general=(), checkpoints=1)
    monkeypatch.setattr(counterfact_parts, "PART", 1)  # four parts of one edit
    real_records = counterfact.counterfact_records
    parts_scored = []

    class Stopped(Exception):
        pass

    def records_then_stop(lm, part, **kw):  # the machine stops while the third part is scored
        if len(parts_scored) == 2:
            raise Stopped
        parts_scored.append([r.id for r in part])
        return real_records(lm, part, **kw)

    with monkeypatch.context() as m:
        m.setattr(counterfact, "counterfact_records", records_then_stop)
        with pytest.raises(Stopped):
            run_method_bench(config, out)
    kept = json.loads((out / "unedited.json").read_text())
    assert {"weights_sha256", "locality_pre_edit", "generation_pre_edit"} <= set(kept)
    assert "evaluation" not in kept and "final" not in kept
    parts_file = out / unedited_row.UNEDITED_PARTS_FILE
    assert [line["first"] for line in map(json.loads, parts_file.read_text().splitlines())] == [0, 1]
    assert write_report(out)["unedited"] is None  # a report meanwhile: no unedited row yet

    # scoring other weights than the row began with is refused, and nothing is written
    (out / "unedited.json").write_text(json.dumps(kept | {"weights_sha256": "f" * 64}))
    with pytest.raises(StateMismatchError, match="the unedited row of this benchmark began with"):
        run_method_bench(config, out)
    assert json.loads((out / "unedited.json").read_text()) == kept | {"weights_sha256": "f" * 64}
    assert len(parts_file.read_text().splitlines()) == 2
    # a broken part before the last is refused with advice about that file alone, not the benchmark's folder
    intact = parts_file.read_text()
    parts_file.write_text("{not json\n" + intact)
    (out / "unedited.json").write_text(json.dumps(kept))
    with pytest.raises(StateMismatchError, match="line 1 is not JSON; delete this file"):
        run_method_bench(config, out)
    parts_file.write_text(intact)

    # a restart scores only the parts still missing; the references are never scored again
    (out / "unedited.json").write_text(json.dumps(kept))
    recomputed = []
    real_locality = unedited_row._locality_pre_edit
    monkeypatch.setattr(unedited_row, "_locality_pre_edit", lambda *a: recomputed.append(a) or real_locality(*a))
    monkeypatch.setattr(generation, "pre_edit_generations", lambda *a: recomputed.append(a))
    monkeypatch.setattr(counterfact, "counterfact_records",
                        lambda lm, part, **kw: parts_scored.append([r.id for r in part]) or real_records(lm, part, **kw))
    full = run_method_bench(config, out)
    ids = [r.id for r in select_edits(config.data, config.n)]
    # the row's parts (two before the stop, two after), then the method's checkpoint's four
    assert parts_scored == [[i] for i in ids] * 2 and recomputed == []
    assert not parts_file.exists()  # in unedited.json now
    done = json.loads((out / "unedited.json").read_text())
    assert {k: done[k] for k in kept} == kept
    # the same scores as the row scored in one pass (to float rounding: other batches)
    whole = finished[1]["unedited"]["evaluation"]["counterfact"]["summary"]
    assert full["unedited"]["evaluation"]["counterfact"]["summary"] == pytest.approx(whole, rel=1e-5)
    assert full["unedited"]["evaluation"]["counterfact"]["summary"]["locality"] == 1.0
    assert "| unedited (before editing) |" in (out / "results.md").read_text()


def test_a_stop_in_a_checkpoint_keeps_the_parts_it_scored_for_the_same_weights(finished, tiny_setup, monkeypatch):
    """A checkpoint's CounterFact records are kept a part at a time: a restart that reaches the
    same edited weights scores only the parts still missing; parts of other weights are scored
    again. The kept line matches an uninterrupted run's."""
    from rlsedit.bench import counterfact_parts
    from rlsedit.bench.methods import CHECKPOINT_PARTS_FILE
    from rlsedit.eval import counterfact

    out = tiny_setup["root"] / "checkpoint-parts"
    out.mkdir()
    for name in ("settings.json", "unedited.json"):  # the same benchmark; its unedited row is done
        shutil.copy(finished[0] / name, out / name)
    config = _config(tiny_setup, methods=("rlsedit",))
    monkeypatch.setattr(counterfact_parts, "PART", 1)
    real_records = counterfact.counterfact_records
    scored: list[list[str]] = []

    class Stopped(Exception):
        pass

    def records(lm, part, **kw):
        scored.append([r.id for r in part])
        if len(scored) == stop_at:
            raise Stopped
        return real_records(lm, part, **kw)

    monkeypatch.setattr(counterfact, "counterfact_records", records)
    parts = out / "rlsedit" / CHECKPOINT_PARTS_FILE
    # batch 1's checkpoint scores e0, e1; batch 2's stops while scoring its third part
    stop_at = 5
    with pytest.raises(Stopped):
        run_method_bench(config, out)
    assert scored == [["e0"], ["e1"], ["e0"], ["e1"], ["e2"]]
    lines = [json.loads(line) for line in parts.read_text().splitlines()]
    assert [line["first"] for line in lines] == [0, 1] and {line["weights"]["batch"] for line in lines} == {2}
    assert [r["batch"] for r in read_progress(out / "rlsedit" / "progress.jsonl")] == [1]

    # parts of other weights (a rebuild that differs by float rounding) are not read back
    tampered = [line | {"weights": line["weights"] | {"edited_weights_sha256": "0" * 64}} for line in lines]
    parts.write_text("".join(json.dumps(line) + "\n" for line in tampered))
    scored.clear()
    stop_at = 2
    with pytest.raises(Stopped):
        run_method_bench(config, out)
    assert scored == [["e0"], ["e1"]]
    assert [json.loads(line)["first"] for line in parts.read_text().splitlines()] == [0]

    # the same weights (the session kept batch 2): only the missing parts are scored
    scored.clear()
    stop_at = None
    result = run_method_bench(config, out)["methods"]["rlsedit"]
    assert scored == [["e1"], ["e2"], ["e3"]]
    assert not parts.exists()  # in the progress line now
    line, whole = result["batches"][1], finished[1]["methods"]["rlsedit"]["batches"][1]
    assert line["resumed"] is True and line["edited_weights_sha256"] == whole["edited_weights_sha256"]
    # parts batch the prompts differently from one pass: the same scores to float rounding
    assert line["evaluation"]["counterfact"]["summary"] == pytest.approx(
        whole["evaluation"]["counterfact"]["summary"], rel=1e-5)


def test_the_forgetting_curve_reads_the_last_checkpoints_scores(tiny_setup, monkeypatch):
    """After the last batch, the checkpoint has just scored every edit on the final weights: the
    forgetting curve (methods and the unedited row) takes those records instead of scoring again."""
    import rlsedit.eval.retention as retention

    def no_second_scoring(*args, **kwargs):
        raise AssertionError("the forgetting curve scored the edits again")

    monkeypatch.setattr(retention, "score_requests", no_second_scoring)
    out = tiny_setup["root"] / "curve-from-checkpoint"
    result = run_method_bench(_config(tiny_setup, methods=("rlsedit",), general=(), checkpoints=1), out)
    final = result["methods"]["rlsedit"]["final"]["retention"]["bins"]["success"]
    last = result["methods"]["rlsedit"]["batches"][-1]["evaluation"]["counterfact"]["summary"]["efficacy"]
    assert sum(b["mean"] * b["count"] for b in final) / sum(b["count"] for b in final) == pytest.approx(last)
    assert "records" not in result["methods"]["rlsedit"]["batches"][-1]["evaluation"]["counterfact"]


def test_progress_lines_name_the_commit_read_when_the_process_began(tiny_setup, monkeypatch):
    """HEAD may move while a long run edits (a commit beside it): every line names the commit
    read once, at the start, not whatever HEAD is when a later method begins."""
    import rlsedit.bench.methods as methods

    commits = iter(["started-here", "moved-later", "moved-again"])
    monkeypatch.setattr(methods, "code_description",
                        lambda: {"rlsedit": "x", "git_commit": next(commits), "git_dirty": False})
    out = tiny_setup["root"] / "code-at-start"
    result = run_method_bench(_config(tiny_setup, methods=("rlsedit", "memit-seq"), general=(), checkpoints=1), out)
    lines = [rec for name in ("rlsedit", "memit-seq") for rec in result["methods"][name]["batches"]]
    assert len(lines) == 4
    assert {rec["code"]["git_commit"] for rec in lines} == {"started-here"}


@pytest.mark.parametrize("method, entries", [("memit-seq", 2), ("rome", 4)])  # one per batch; per request
def test_a_lost_session_is_rebuilt_from_the_target_log(finished, tiny_setup, method, entries):
    """A run folder whose session was lost (a new machine gets only the committed files) rebuilds
    its batches from the logged target residuals: no optimisation, the same weights bit for bit,
    the first run's progress lines (timings, scores) kept."""
    import shutil

    out = tiny_setup["root"] / f"lost-state-{method}"
    config = _config(tiny_setup, methods=(method,), general=(), checkpoints=1)
    first = run_method_bench(config, out)["methods"][method]
    assert len(list((out / method / "targets").glob("*.safetensors"))) == entries
    shutil.rmtree(out / method / "state")
    (out / method / "result.json").unlink()
    again = run_method_bench(config, out)["methods"][method]
    assert again["status"]["edits_applied"] == 4
    assert again["batches"] == first["batches"]
    assert again["rebuilt_batches"]["count"] == 2
    assert again["rebuilt_batches"]["identical"] == again["rebuilt_batches"]["checked"] == 2
    assert again["rebuilt_batches"]["max_drift_rel_diff"] == 0.0
    assert again["rebuilt_batches"]["max_layer_rel_diff"] == 0.0
    assert again["status"]["weights_sha256"] == first["status"]["weights_sha256"]


def test_a_batch_whose_targets_were_logged_before_a_stop_replays_them_and_is_not_timed(finished, tiny_setup):
    """A stop after a batch logged its targets but before its progress line (the session lost with
    the machine): the resumed run applies it from the logged targets, with the same weights, and
    marks the line ``targets_replayed``: its seconds time keys and the solve, not an edit, so
    s/edit leaves it out."""

    out = tiny_setup["root"] / "lost-last-line"
    config = _config(tiny_setup, methods=("memit-seq",), general=(), checkpoints=1)
    first = run_method_bench(config, out)["methods"]["memit-seq"]
    _lose_session(out / "memit-seq", keep_lines=1)
    again = run_method_bench(config, out)["methods"]["memit-seq"]
    assert again["status"]["weights_sha256"] == first["status"]["weights_sha256"]
    last = again["batches"][-1]
    assert last["batch"] == 2 and last["targets_replayed"] is True and last["total_s"] is not None
    assert "targets_replayed" not in again["batches"][0]
    # the first line written after the rebuild says how the rebuilt weights matched: bit for bit here
    assert last["rebuilt_before"]["count"] == 1
    assert last["rebuilt_before"]["identical"] == last["rebuilt_before"]["checked"] == 1
    assert "rebuilt_before" not in again["batches"][0]
    assert "(after a rebuild ≈" not in "".join(_trajectory_rows(out, "memit-seq"))
    assert again["seconds_per_edit"] == pytest.approx(again["batches"][0]["total_s"] / 2)
    assert again["by_device"] == {"cpu": {"seconds_per_edit": again["seconds_per_edit"],
                                          "solve_seconds_per_batch": again["batches"][0]["solve_s"]}}


def _lose_session(folder, *, keep_lines: int | None = None) -> None:
    """What a new machine finds of run ``folder``: no session, no result.json; with ``keep_lines``,
    only that many progress lines (a stop after a batch whose line was not yet written)."""
    import shutil

    shutil.rmtree(folder / "state")
    (folder / "result.json").unlink()
    if keep_lines is not None:
        lines = (folder / "progress.jsonl").read_text().splitlines()
        (folder / "progress.jsonl").write_text("".join(line + "\n" for line in lines[:keep_lines]))


def _trajectory_rows(out, name: str) -> list[str]:
    """The rows of results.md's "Along the stream" table for run ``name``."""
    md = (out / "results.md").read_text()
    table = md.split("## Along the stream", 1)[1]
    return [row for row in table.splitlines() if row.startswith(f"| {name} | ")]


def test_checkpoints_after_an_inexact_rebuild_are_marked(finished, tiny_setup):
    """A run resumed on another CPU rebuilds its lost batches only to float rounding: the checkpoint
    at and after the first line written from those weights carries the largest difference, the
    ones before do not."""
    from rlsedit.bench.methods_report import write_report

    out = tiny_setup["root"] / "inexact-rebuild"
    config = _config(tiny_setup, methods=("memit-seq",), general=(), checkpoints=2)
    run_method_bench(config, out)
    folder = out / "memit-seq"
    (folder / "result.json").unlink()  # reported from progress.jsonl, as a run still going
    lines = [json.loads(line) for line in (folder / "progress.jsonl").read_text().splitlines()]
    assert [bool(r.get("evaluation")) for r in lines] == [True, True]
    lines[1]["rebuilt_before"] = {"count": 1, "identical": 0, "checked": 1, "max_layer_rel_diff": 0.0657}
    (folder / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_report(out, ["memit-seq"])
    assert [row.split(" | ")[1] for row in _trajectory_rows(out, "memit-seq")] == ["2", "4 (after a rebuild ≈6.6e-02)"]
    # a bit-for-bit rebuild is no mark
    lines[1]["rebuilt_before"]["identical"] = 1
    (folder / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_report(out, ["memit-seq"])
    assert "(after a rebuild ≈" not in "".join(_trajectory_rows(out, "memit-seq"))


def test_timings_are_given_per_device_and_leave_out_replayed_targets():
    """A stream that moved from a CPU to a GPU and back: one s/edit per device (lines written
    before lines named their machine count under the settings' device), batches with replayed
    targets (all or some) out."""
    from rlsedit.bench.methods_report import _timing_cells
    from rlsedit.bench.timing import timing_summary

    def line(b, total, device=None, **extra):
        rec = {"batch": b, "edits": 10 * b, "total_s": total, "solve_s": total / 10, **extra}
        if device:
            rec["machine"] = {"device": device}
        return rec

    records = [line(1, 30.0), line(2, 20.0, "cpu"), line(3, 4.0, "cuda"), line(4, 6.0, "cuda"),
               line(5, 1.0, "cpu", targets_replayed=True), line(6, 40.0, "cpu"),
               {"batch": 7, "edits": 70, "total_s": None, "solve_s": None, "resumed": True},
               line(8, 2.0, "cpu", targets_replayed_edits=4)]  # ROME resumed mid-batch
    t = timing_summary(records, first_device="cpu")
    assert t["by_device"]["cpu"]["seconds_per_edit"] == pytest.approx(90.0 / 30)
    assert t["by_device"]["cuda"]["seconds_per_edit"] == pytest.approx(10.0 / 20)
    assert t["by_device"]["cuda"]["solve_seconds_per_batch"] == pytest.approx(0.5)
    assert t["seconds_per_edit"] == pytest.approx(100.0 / 50)
    assert _timing_cells(t) == ("3.00 (cpu) · 0.50 (cuda)", "3.000 (cpu) · 0.500 (cuda)")
    one = timing_summary(records[:2], first_device="cpu")
    assert list(one["by_device"]) == ["cpu"] and _timing_cells(one) == ("2.50", "2.500")
    assert _timing_cells({"seconds_per_edit": None, "solve_seconds_per_batch": None}) == ("–", "–")


def test_timings_are_given_per_cpu_model_when_a_stream_moved_between_cpus():
    """A CPU stream resumed on another CPU model: one s/edit per model, named without trademark
    marks; a line that named no CPU stays plain 'cpu'. One model throughout keeps one figure."""
    from rlsedit.bench.methods_report import _timing_cells
    from rlsedit.bench.timing import timing_summary

    def line(b, total, cpu=None):
        machine = {"device": "cpu", **({"cpu": cpu} if cpu else {})}
        return {"batch": b, "edits": 10 * b, "total_s": total, "solve_s": 1.0, "machine": machine}

    xeon, epyc = "Intel(R) Xeon(R) Processor", "AMD EPYC"
    records = [line(1, 40.0, xeon), line(2, 42.0, xeon), line(3, 80.0, epyc), line(4, 84.0, epyc)]
    t = timing_summary(records, first_device="cpu")
    assert list(t["by_device"]) == ["cpu: Intel Xeon Processor", "cpu: AMD EPYC"]
    assert t["by_device"]["cpu: Intel Xeon Processor"]["seconds_per_edit"] == pytest.approx(82.0 / 20)
    assert t["by_device"]["cpu: AMD EPYC"]["seconds_per_edit"] == pytest.approx(164.0 / 20)
    assert _timing_cells(t)[0] == "4.10 (cpu: Intel Xeon Processor) · 8.20 (cpu: AMD EPYC)"
    unnamed = timing_summary([line(1, 40.0)] + records[1:], first_device="cpu")
    assert list(unnamed["by_device"]) == ["cpu", "cpu: Intel Xeon Processor", "cpu: AMD EPYC"]
    same = timing_summary([line(1, 40.0), line(2, 42.0, xeon)], first_device="cpu")
    assert list(same["by_device"]) == ["cpu"] and _timing_cells(same)[0] == "4.10"


def test_progress_without_a_journal_or_a_target_log_is_redone(finished, tiny_setup):
    """A run folder whose session and target log were both lost keeps no credit for its progress lines."""
    import shutil

    out = tiny_setup["root"] / "lost-all"
    config = _config(tiny_setup, methods=("memit-seq",), general=(), checkpoints=1)
    first = run_method_bench(config, out)["methods"]["memit-seq"]
    shutil.rmtree(out / "memit-seq" / "state")
    (out / "memit-seq" / "result.json").unlink()
    shutil.rmtree(out / "memit-seq" / "targets")
    again = run_method_bench(config, out)["methods"]["memit-seq"]
    assert again["status"]["edits_applied"] == 4
    assert all(b["total_s"] is not None and "resumed" not in b for b in again["batches"])
    assert again["rebuilt_batches"] is None
    assert again["batches"][0]["finished_at"] >= first["batches"][-1]["finished_at"]
    assert again["status"]["weights_sha256"] == first["status"]["weights_sha256"]


def test_a_lost_ft_session_is_computed_again_and_its_progress_kept(finished, tiny_setup):
    """FT logs no value targets: a lost session's batches are computed again (the same weights bit
    for bit on the same machine), compared with their progress lines, which are kept, scores and all;
    the next new line says how the rebuild matched."""

    out = tiny_setup["root"] / "lost-ft"
    config = _config(tiny_setup, methods=("ft",), general=(), checkpoints=1)
    first = run_method_bench(config, out)["methods"]["ft"]
    assert not (out / "ft" / "targets").exists()
    _lose_session(out / "ft")
    again = run_method_bench(config, out)["methods"]["ft"]
    assert again["batches"] == first["batches"]
    assert again["rebuilt_batches"]["count"] == 2
    assert again["rebuilt_batches"]["identical"] == again["rebuilt_batches"]["checked"] == 2
    assert again["status"]["weights_sha256"] == first["status"]["weights_sha256"]
    # a stop after batch 1 (its line kept, the session lost): batch 1 is computed again, batch 2 runs
    _lose_session(out / "ft", keep_lines=1)
    resumed = run_method_bench(config, out)["methods"]["ft"]
    assert resumed["batches"][0] == first["batches"][0]
    assert resumed["batches"][1]["rebuilt_before"]["count"] == 1
    assert resumed["batches"][1]["rebuilt_before"]["identical"] == 1
    assert resumed["status"]["weights_sha256"] == first["status"]["weights_sha256"]


def test_report_only_gathers_finished_runs(finished, tiny_setup, capsys):
    from rlsedit import cli

    out, full = finished
    assert cli.main(["bench", "methods", "--report-only", "--out", str(out), "--methods", "ft,rlsedit,rome"]) == 0
    md = capsys.readouterr().out
    assert md.index("| ft |") < md.index("| rlsedit |")
    assert "| rome | not run" in md
    runs = json.loads((out / "results.json").read_text())["runs"]
    # the named ones first, then the folder's other runs (their rows are never dropped)
    assert runs[:3] == ["ft", "rlsedit", "rome"] and sorted(runs[3:]) == sorted(set(full["methods"]) - {"ft", "rlsedit"})
    with pytest.raises(InvalidRequestError, match="no benchmark"):
        write_report(tiny_setup["root"] / "nothing-here")


def test_processes_sharing_an_out_score_the_unedited_model_once(tmp_path):
    # two runs of the bench on one out (e.g. one method per process): the second waits for
    # the first's unedited scores and reads them instead of scoring the base model again
    from rlsedit.bench import resume
    from two_processes import Gate, race

    gate, got = Gate(), {}

    def score():
        gate()
        return {"weights_sha256": "a" * 64, "evaluation": {}}

    def run(name):
        got[name] = resume.unedited_once(tmp_path, score)

    race(run, gate)
    assert gate.entries == ["first"]
    assert got["first"] == got["second"] == json.loads((tmp_path / "unedited.json").read_text())
