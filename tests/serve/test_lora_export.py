"""``rlsedit export --lora``: the edits as a peft LoRA adapter; base + adapter = edited model."""

from __future__ import annotations

import json

import pytest
import torch

from serve_tiny import build_served_world, make_served_state, one_thread

from session_tiny import cli, tiny_runtime

peft = pytest.importorskip("peft")

__all__ = ["one_thread"]

PROMPTS = ["Paris 0 is located in", "The mother tongue of Madrid 1 is", "Chicago 2 plays the"]


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    world = build_served_world(root)
    make_served_state(world, root / "state", n_edits=3)
    return world, root / "state"


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in PROMPTS])


def _base_with(world, adapter):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world.model, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


def test_full_rank_adapter_gives_the_edited_logits(edited, tmp_path):
    from rlsedit.session.lora import export_lora
    from rlsedit.session.session import Session

    world, state = edited
    with Session.open(state, runtime=tiny_runtime(world)) as session:
        report = export_lora(session, tmp_path / "exact")
        want = _logits(session.lm.model, session.lm.tokenizer)
        tokenizer = session.lm.tokenizer
        layers = session.editor.layers
    assert 1 <= report.rank <= 3  # one batch of 3 edits: rank(ΔW_l) ≤ 3
    assert all(d["relative_error"] < 1e-5 for d in report.layers.values()), report.layers
    model = _base_with(world, tmp_path / "exact")
    got = _logits(model, tokenizer)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    with model.disable_adapter():
        plain = _logits(model, tokenizer)
    assert (plain - want).abs().max() > 1e-3  # the adapter is what carries the edits
    assert sorted(json.loads((tmp_path / "exact" / "adapter_config.json").read_text())["layers_to_transform"]) \
        == sorted(layers)


def test_truncated_adapter_reports_its_error(edited, tmp_path):
    world, state = edited
    code, out, err = cli(["export", "--state", str(state), "--lora", str(tmp_path / "r1"), "--rank", "1",
                          "--cache-dir", str(world.cache)])
    assert code == 0, err
    report = json.loads((tmp_path / "r1" / "rlsedit_lora.json").read_text())
    assert report["rank"] == 1 and "relative error" in out
    errors = {int(l): d["relative_error"] for l, d in report["layers"].items()}
    assert max(errors.values()) > 1e-3  # rank(ΔW) > 1: truncation loses something, and says so
    # the reported error is the merged adapter's: ‖ΔW − BA‖_F / ‖ΔW‖_F
    from rlsedit.session.session import Session
    from rlsedit.model.weights import get_W

    merged = _base_with(world, tmp_path / "r1").merge_and_unload()
    with Session.open(state, runtime=tiny_runtime(world)) as session:
        for l, relative in errors.items():
            W, W0 = get_W(session.lm, l).double(), session.editor.W0[l].double()
            mlp = merged.model.layers[l].mlp.down_proj.weight.detach().T.double()
            measured = float(torch.linalg.matrix_norm(mlp - W) / torch.linalg.matrix_norm(W - W0))
            assert measured == pytest.approx(relative, rel=1e-3, abs=1e-6)
