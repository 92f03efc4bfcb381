"""``rlsedit bench speed`` on a tiny random model saved to disk: phases add up to the wall
time, the reference path runs the same edits, and the report carries every promised key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from locate_tiny import SENTENCES, make_lm
from rlsedit.bench.speed import PHASES, SpeedBenchConfig, format_markdown, history_check, run_speed_bench
from rlsedit.cli import main
from rlsedit.errors import InvalidRequestError
from tiny_models import save

SUBJECTS = ["The Eiffel Tower", "Toko Yasuda", "Danielle Darrieux", "Madrid", "Autonomous University",
            "Michael Jordan"]
TARGETS = [("Rome", "Paris"), ("piano", "guitar"), ("Swedish", "French"), ("Sweden", "Spain"),
           ("tennis", "basketball"), ("London", "Berlin")]
FAST = {"v_num_grad_steps": 4, "context_count": 1, "context_length": 3, "mom2_update_weight": 10.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speed")
    lm = make_lm("llama")
    save(root / "model", lm.model, lm.tokenizer)
    (root / "corpus.txt").write_text("\n".join(SENTENCES * 4))
    edits = [{"id": f"e{i}", "prompt": "{} is located in", "subject": s, "target_new": new, "target_true": old,
              "paraphrases": [f"As they say, {s} is located in"], "neighborhood": ["The Louvre is located in"],
              "neighborhood_answers": [old]}
             for i, (s, (new, old)) in enumerate(zip(SUBJECTS, TARGETS))]
    (root / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in edits))
    (root / "hparams.json").write_text(json.dumps(FAST))
    return {"root": root}


def _config(setup, **changes) -> SpeedBenchConfig:
    root = setup["root"]
    base = dict(data=str(root / "edits.jsonl"), model=str(root / "model"), n=6, batch_size=2, reference_n=4,
                hparams=str(root / "hparams.json"), corpus=str(root / "corpus.txt"), cache_dir=str(root / "cache"),
                threads=1)
    return SpeedBenchConfig(**{**base, **changes})


def test_stream_phases_reference_and_history(setup):
    result = run_speed_bench(_config(setup))
    for key in ("seconds_per_edit", "reference_seconds_per_edit", "speedup", "peak_rss_mb", "efficacy",
                "reference_efficacy"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    rows = result["batches"]
    assert [r["edits_done"] for r in rows] == [2, 4, 6]
    # the phases (bookkeeping = the rest of the wall time) add up to each batch's wall time
    for r in rows:
        assert sum(r[p] for p in PHASES) == pytest.approx(r["seconds"], rel=1e-9)
        assert r["targets"] > 0 and r["keys"] > 0 and r["solve"] > 0
    assert result["seconds_per_edit"] == pytest.approx(sum(r["seconds"] for r in rows) / 6)
    assert sum(result["phases_per_edit"].values()) == pytest.approx(result["seconds_per_edit"])
    # the reference ran the first 4 edits in the same two batches
    assert result["reference_n"] == 4
    assert [r["edits_done"] for r in result["reference_batches"]] == [2, 4]
    assert result["speedup"] == pytest.approx(
        result["reference_seconds_per_edit"] / result["seconds_per_edit_on_reference_edits"])
    # same objective, same keys and solve: the two paths make the same edits to float rounding
    assert abs(result["efficacy"] - result["reference_efficacy"]) <= 0.25
    assert 0.0 <= result["efficacy_all"] <= 1.0
    assert result["peak_rss_mb"] > result["model_mb"] > 0
    assert result["history"]["batches_each"] == 1
    text = format_markdown(result)
    assert "speedup over the per-request reference" in text and "peak RSS" in text


def test_history_check_reads_first_and_last_tenth():
    rows = [{"edits_done": 10 * (i + 1), "size": 10, "seconds": 1.0 + (i >= 18), "targets": 0.5, "keys": 0.2,
             "solve": 0.1, "bookkeeping": 0.2 + (i >= 18), "target_steps_mean": 10.0} for i in range(20)]
    rows[19]["snapshot"] = True
    rows[19]["bookkeeping"] += 3.0
    rows[19]["seconds"] += 3.0
    h = history_check(rows)
    assert h["batches_each"] == 2
    # the snapshot batch is set apart for bookkeeping, and its own cost reported
    assert h["bookkeeping_between_snapshots"]["ratio"] == pytest.approx(6.0)
    assert h["snapshot_bookkeeping_seconds"] == {"first": pytest.approx(4.2), "last": pytest.approx(4.2), "count": 1}
    rows[19]["bookkeeping"] -= 3.0
    rows[19]["seconds"] -= 3.0
    h = history_check(rows)
    assert h["total"]["first"] == pytest.approx(0.1) and h["total"]["last"] == pytest.approx(0.2)
    assert h["total"]["ratio"] == pytest.approx(2.0)
    assert h["bookkeeping"]["ratio"] == pytest.approx(6.0)
    assert h["targets"]["ratio"] == pytest.approx(1.0)


def test_cli_json_and_out(setup, capsys, tmp_path):
    root = setup["root"]
    code = main(["bench", "speed", "--data", str(root / "edits.jsonl"), "--model", str(root / "model"),
                 "--n", "4", "--batch-size", "2", "--reference-n", "2", "--hparams", str(root / "hparams.json"),
                 "--corpus", str(root / "corpus.txt"), "--cache-dir", str(root / "cache"), "--threads", "1",
                 "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 4 and printed["reference_n"] == 2
    assert json.loads((tmp_path / "out" / "result.json").read_text())["speedup"] == printed["speedup"]
    assert (tmp_path / "out" / "speed.png").stat().st_size > 0
    assert "s/edit" in (tmp_path / "out" / "result.md").read_text()


def test_target_methods_side_by_side_on_the_same_edits(setup):
    result = run_speed_bench(_config(setup, n=4, reference_n=2, targets=("adam", "onestep", "verify"), gen_n=2))
    assert result["targets"] == ["adam", "onestep", "verify"] and set(result["by_target"]) == set(result["targets"])
    for name, run in result["by_target"].items():
        assert run["target_method"] == name
        assert [r["edits_done"] for r in run["batches"]] == [2, 4]
        assert math.isfinite(run["seconds_per_edit"]) and run["peak_rss_mb"] > run["model_mb"]
        for key in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= run["quality_all"][key] <= 1.0, (name, key)
        assert run["generation"]["counts"]["edits"] == 2
        assert 0.0 <= run["generation"]["summary"]["edit_begins"] <= 1.0
    # the Adam loop takes steps, the one-step target none; verify only where the line search fell short
    assert result["by_target"]["adam"]["target_steps_per_edit"] > 0
    assert result["by_target"]["onestep"]["target_steps_per_edit"] == 0
    assert 0 <= result["by_target"]["verify"]["target_steps_per_edit"] <= FAST["v_num_grad_steps"]
    # the per-request reference runs once, after the first stream
    assert "reference_seconds_per_edit" in result["by_target"]["adam"]
    assert all("reference_seconds_per_edit" not in result["by_target"][m] for m in ("onestep", "verify"))
    text = format_markdown(result)
    assert all(f"| {m} |" in text and f"### {m}" in text for m in result["targets"])


def test_cli_one_target_method(setup, capsys):
    root = setup["root"]
    code = main(["bench", "speed", "--data", str(root / "edits.jsonl"), "--model", str(root / "model"),
                 "--n", "2", "--batch-size", "2", "--reference-n", "0", "--hparams", str(root / "hparams.json"),
                 "--corpus", str(root / "corpus.txt"), "--cache-dir", str(root / "cache"), "--threads", "1",
                 "--targets", "onestep", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["target_method"] == "onestep" and printed["target_steps_per_edit"] == 0
    assert printed["batches"][0]["target_steps"] == [0, 0]


def test_cli_variants_compare_named_settings(setup, capsys):
    root = setup["root"]
    code = main(["bench", "speed", "--data", str(root / "edits.jsonl"), "--model", str(root / "model"),
                 "--n", "2", "--batch-size", "2", "--reference-n", "0", "--hparams", str(root / "hparams.json"),
                 "--corpus", str(root / "corpus.txt"), "--cache-dir", str(root / "cache"), "--threads", "1",
                 "--variant", 'one-step={"v_num_grad_steps": 1}', "--targets", "adam,one-step", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["targets"] == ["adam", "one-step"]
    assert printed["settings"]["variants"] == {"one-step": {"v_num_grad_steps": 1}}
    # one Adam step allowed: the loop evaluates once and stops, so no request moves more than that
    assert printed["by_target"]["one-step"]["target_steps_per_edit"] == 0
    assert printed["by_target"]["adam"]["target_steps_per_edit"] > 0


@pytest.mark.parametrize("spec, needle", [
    ("fast", "LABEL="), ("fast={nope", "not JSON"), ("fast=[1]", "LABEL="),
])
def test_cli_malformed_variant_is_a_usage_error(setup, capsys, spec, needle):
    root = setup["root"]
    code = main(["bench", "speed", "--data", str(root / "edits.jsonl"), "--model", str(root / "model"),
                 "--n", "2", "--variant", spec, "--targets", "fast"])
    assert code == 2 and needle in capsys.readouterr().err


def test_variant_with_an_unknown_field_is_refused_before_any_stream(setup):
    with pytest.raises(InvalidRequestError, match="variant 'odd'.*v_nonsense"):
        run_speed_bench(_config(setup, n=2, reference_n=0, targets=("odd",), variants={"odd": {"v_nonsense": 1}}))


@pytest.mark.parametrize("changes, needle", [
    ({"targets": ("adam",), "variants": {"adam": {}}}, "method names"),
    ({"targets": ("quick",)}, "targets"), ({"targets": ("adam",), "variants": {"fast": {}}}, "not among"),
    ({"variants": {"fast": 3}, "targets": ("fast",)}, "variants must"),
    ({"reference_n": 9}, "reference_n"), ({"n": 0}, "n must be"), ({"batch_size": 0}, "batch_size"),
    ({"threads": 0}, "threads"), ({"targets": ("sgd",)}, "targets"), ({"targets": ("adam", "adam")}, "targets"),
    ({"gen_n": -1}, "gen_n"),
])
def test_bad_settings_are_refused(setup, changes, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        _config(setup, **changes)


def test_more_edits_than_records_is_refused(setup):
    with pytest.raises(InvalidRequestError, match="fewer than n"):
        run_speed_bench(_config(setup, n=7, reference_n=0))


def test_floor_counts_scale_with_steps_and_layers(setup):
    from rlsedit.bench.floor import batch_flops, floor_summary
    from rlsedit.model.load import load_model
    from rlsedit.requests import read_requests

    lm = load_model(str(setup["root"] / "model"))
    reqs = read_requests(str(setup["root"] / "edits.jsonl"))[:2]
    prefixes = ["{}", "A b c. {}"]
    one = batch_flops(lm, [1, 2], reqs, prefixes, [1, 1])
    more = batch_flops(lm, [1, 2], reqs, prefixes, [5, 5])
    assert more["targets"] > one["targets"] > 0
    assert more["keys"] == one["keys"] > 0          # keys do not depend on the steps
    wider = batch_flops(lm, [1, 2, 3], reqs, prefixes, [1, 1])
    assert wider["keys"] > one["keys"] and wider["solve"] == pytest.approx(one["solve"] * 1.5)
    summary = floor_summary(one, 2, {"float32": 1e9})
    assert summary["floor_seconds_per_edit_total"] == pytest.approx(sum(one.values()) / 2 / 1e9)


def test_state_memory_counts_each_storage_once_and_not_the_models_weights():
    import torch

    from rlsedit.bench.speed import _editor_state_mb, _tensor_mb
    from rlsedit.editors import RLSEdit, RLSEditConfig

    a = torch.zeros(256, 1024)  # 1 MiB
    assert _tensor_mb([a, a, a[:10], torch.zeros(512, 1024)]) == 3.0
    lm = make_lm()
    X = torch.randn(lm.d_k, 100, dtype=torch.float64)
    editor = RLSEdit(lm, RLSEditConfig(layers=(1, 2)), moments={l: X @ X.T / 100 for l in (1, 2)},
                     prefixes=["{}"])
    d_k, d_v = editor.W0[1].shape
    # per layer: W0 (shared by the editor and the RLS state), the RLS state's W and C (float32),
    # the anchor moment (float64); the model's own W is the model's, not the state's
    per_layer = 4 * (2 * d_k * d_v + d_k * d_k) + 8 * d_k * d_k
    scalars = sum(t.element_size() for t in editor.state_dict().values() if t.dim() == 0)
    assert _editor_state_mb(editor) == pytest.approx((2 * per_layer + scalars) / 2**20, rel=1e-12)
    # AlphaEdit also holds a null-space projector per layer (float64, rebuilt on load, not saved)
    from rlsedit.editors import AlphaEdit, AlphaEditConfig

    alpha = AlphaEdit(lm, AlphaEditConfig(layers=(1, 2)), moments=editor.moments, prefixes=["{}"])
    alpha_per_layer = 4 * d_k * d_v + 8 * d_k * d_k * 3  # W0; E[kkᵀ], accumulated Gram, projector
    assert _editor_state_mb(alpha) == pytest.approx(2 * alpha_per_layer / 2**20, rel=1e-12)
    assert not [k for k in alpha.state_dict() if k.endswith(".projector")]
